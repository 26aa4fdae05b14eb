// The one registration unit of vitfast._C: every op schema is declared here; the CPU and CUDA
// implementations register themselves per dispatch key (TORCH_LIBRARY_IMPL) in csrc/cpu and csrc/cuda.
// The module has no Python functions: importing it runs these static registrations, and the ops are
// reached as torch.ops.vitfast_C.<name>.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vitfast_C, m) {
  // masked_patch_embed: images [B,C,H,W], weight [D, C*p*p], bias [D]?, pos_embed [L,D]?,
  // keep_idx/pos_idx [B,K] int64 -> tokens [B,K,D]. All floating tensors share one dtype.
  m.def("masked_patch_embed_forward(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, "
        "Tensor keep_idx, Tensor pos_idx, int patch_size) -> Tensor");
  // Gradients (d_images [B,C,H,W], d_weight [D,C*p*p], d_bias [D], d_pos_embed [L,D]); an output whose
  // output_mask entry is false is returned as an empty tensor.
  m.def("masked_patch_embed_backward(Tensor grad_tokens, Tensor images, Tensor weight, Tensor keep_idx, "
        "Tensor pos_idx, int patch_size, int num_positions, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
