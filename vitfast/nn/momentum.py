"""A momentum (EMA) teacher and the cosine momentum schedule (MoCo v3, DILEMMA, DINO, MAE-CT).

    teacher = MomentumTeacher(encoder=self.model, projector=self.projector)   # deep copies, no gradient
    k = teacher.projector(teacher.encoder(x))                                 # under torch.no_grad()
    teacher.update(dict(encoder=self.model, projector=self.projector), cosine_momentum(step, total_steps, 0.99))

``update`` sets every teacher parameter to m·teacher + (1 − m)·student (the official MoCo v3 / DINO formula) and
copies every buffer (BatchNorm running statistics, counters) from the student. The teacher is an ``nn.Module``
(its parts are submodules, by name), so its weights travel with the owning method's ``state_dict``: an exact
resume restores them, and the schedule is a pure function of the step, so nothing else needs saving. Its
parameters have ``requires_grad=False``, so ``Method.param_groups`` leaves them out of the optimizer. Train /
eval mode follows the owner (MoCo v3's momentum encoder runs its BatchNorms in train mode, as the student does).
"""
from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

__all__ = ["MomentumTeacher", "cosine_momentum"]


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """m(step) = final − (final − base)·(cos(π·step / total_steps) + 1) / 2: ``base`` at step 0, ``final`` at the
    end.

    MoCo v3 (0.99 → 1), DINO (0.996 → 1), per optimizer step; ``step`` beyond ``total_steps`` stays at ``final``.
    """
    if not 0.0 <= base <= 1.0 or not 0.0 <= final <= 1.0:
        raise ValueError(f"cosine_momentum: base and final must be in [0, 1], got base={base!r}, final={final!r}")
    if total_steps <= 0:
        return final
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MomentumTeacher(nn.Module):
    """Deep copies of the given modules (by name), updated only by EMA of the student's weights."""

    def __init__(self, modules: Mapping[str, nn.Module] = None, **named: nn.Module):
        parts = {**(dict(modules) if modules is not None else {}), **named}
        if not parts:
            raise ValueError("MomentumTeacher: give at least one module to copy, e.g. MomentumTeacher(encoder=vit)")
        for name, module in parts.items():
            if not isinstance(module, nn.Module):
                raise TypeError(f"MomentumTeacher: {name} must be an nn.Module, got {type(module).__name__}")
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, copy.deepcopy(module))
        self.requires_grad_(False)

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[name]

    def keys(self):
        return self._modules.keys()

    def _pairs(self, student: Mapping[str, nn.Module]):
        if set(student) != set(self.keys()):
            raise ValueError(f"MomentumTeacher.update: student parts must be {sorted(self.keys())}, "
                             f"got {sorted(student)}")
        for name, teacher in self._modules.items():
            theirs = dict(student[name].named_parameters()), dict(student[name].named_buffers())
            mine = dict(teacher.named_parameters()), dict(teacher.named_buffers())
            if set(theirs[0]) != set(mine[0]) or set(theirs[1]) != set(mine[1]):
                raise ValueError(f"MomentumTeacher.update: the student's {name} does not have the teacher's layout")
            yield mine, theirs

    @torch.no_grad()
    def update(self, student: Mapping[str, nn.Module], momentum: float) -> None:
        """teacher ← momentum·teacher + (1 − momentum)·student for parameters; buffers copied from the student."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MomentumTeacher.update: momentum must be in [0, 1], got {momentum!r}")
        for (params, buffers), (student_params, student_buffers) in self._pairs(student):
            names = sorted(params)
            if names:
                mine = [params[n] for n in names]
                torch._foreach_mul_(mine, momentum)
                torch._foreach_add_(mine, [student_params[n].detach() for n in names], alpha=1.0 - momentum)
            for name, buffer in buffers.items():
                buffer.copy_(student_buffers[name])

    @torch.no_grad()
    def copy_from(self, student: Mapping[str, nn.Module]) -> None:
        """Make the teacher an exact copy of the student (after ``--init`` loads new student weights)."""
        for (params, buffers), (student_params, student_buffers) in self._pairs(student):
            for name, param in params.items():
                param.copy_(student_params[name])
            for name, buffer in buffers.items():
                buffer.copy_(student_buffers[name])
