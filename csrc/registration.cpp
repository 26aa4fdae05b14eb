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

  // masked_pixel_loss: pred [B,N,p*p*C], images [B,C,H,W] (pred's dtype, or float32 with an fp16/bf16 pred),
  // mask [B,N] float32 (float64 for float64 pred) -> (loss [] in the promoted dtype of pred and images,
  // stats [B,N,2] = per-patch (mean, 1/sqrt(var + 1e-6)) in mask's dtype, 0 for unmasked patches; [0] without
  // norm_pix). No [B,N,p*p*C] target is materialised.
  m.def("masked_pixel_loss_forward(Tensor pred, Tensor images, Tensor mask, int patch_size, bool norm_pix) "
        "-> (Tensor, Tensor)");
  // d_pred [B,N,p*p*C] (pred's dtype), the target recomputed from images and the forward's stats.
  m.def("masked_pixel_loss_backward(Tensor grad_loss, Tensor pred, Tensor images, Tensor mask, Tensor stats, "
        "int patch_size, bool norm_pix) -> Tensor");

  // relation_loss: q, k [B,N,C,d_h] (one dtype), positions [B,N] int64? (null: identity order), targets [B,N,N]
  // int64? (null: 9 direction classes from positions on a grid_size x grid_size grid), pair_mask [N,N]/[B,N,N] bool?
  // -> (loss [] opmath dtype, accuracy [] float32, count [] int64 = selected pairs). No [B,C,N,N] logits stored.
  m.def("relation_loss_forward(Tensor q, Tensor k, Tensor? positions, Tensor? targets, Tensor? pair_mask, "
        "int grid_size, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  // (d_q, d_k) in q's dtype, the logits recomputed per tile; an output whose output_mask entry is false is empty.
  m.def("relation_loss_backward(Tensor grad_loss, Tensor count, Tensor q, Tensor k, Tensor? positions, "
        "Tensor? targets, Tensor? pair_mask, int grid_size, float label_smoothing, bool[2] output_mask) "
        "-> (Tensor, Tensor)");

  // relation_mlp_loss: u, v [B,N,H], weight [C_out,H], bias [C_out] (one dtype), positions [B,N] int64? (null: identity
  // order), pair_mask [N,N]/[B,N,N] bool?, task "direction" (C_out = 9, cross-entropy) | "offset" (C_out = 2, squared
  // error), activation "gelu" | "relu" -> (loss [] opmath dtype, accuracy [] float32, count [] int64 = selected
  // pairs). No [B,N,N,H] hidden activations stored.
  m.def("relation_mlp_loss_forward(Tensor u, Tensor v, Tensor weight, Tensor bias, Tensor? positions, "
        "Tensor? pair_mask, int grid_size, str task, str activation, float label_smoothing) "
        "-> (Tensor, Tensor, Tensor)");
  // (d_u, d_v, d_weight, d_bias) in the inputs' dtype, the hidden recomputed per row; unrequested outputs are empty.
  m.def("relation_mlp_loss_backward(Tensor grad_loss, Tensor count, Tensor u, Tensor v, Tensor weight, Tensor bias, "
        "Tensor? positions, Tensor? pair_mask, int grid_size, str task, str activation, float label_smoothing, "
        "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // contrastive_loss (NT-Xent, InfoNCE, SupCon; vitfast/ops/contrastive_loss.py): anchors [A,D], pool [M,D] (one
  // dtype), anchor_labels [A], pool_labels [M], anchor_self [A] int64 (the anchor's own pool row, -1 if none)
  // -> (loss [] opmath dtype, lse [A] opmath dtype (0 for anchors without positives), count [A] int32 = positives
  // per anchor). No [A,M] logits stored.
  m.def("contrastive_loss_forward(Tensor anchors, Tensor pool, Tensor anchor_labels, Tensor pool_labels, "
        "Tensor anchor_self, float inv_temperature, float loss_scale) -> (Tensor, Tensor, Tensor)");
  // (d_anchors, d_pool) in the inputs' dtype, the logits recomputed per tile from the saved lse and count; an output
  // whose output_mask entry is false is empty.
  m.def("contrastive_loss_backward(Tensor grad_loss, Tensor anchors, Tensor pool, Tensor anchor_labels, "
        "Tensor pool_labels, Tensor anchor_self, Tensor lse, Tensor count, float inv_temperature, float loss_scale, "
        "bool[2] output_mask) -> (Tensor, Tensor)");

  // dino_loss's streaming softmax primitives over K prototypes (vitfast/ops/dino_loss.py): x [R,d], keys [K,d],
  // values [K,e] (one dtype); key_scale, value_scale, bias [K] in the accumulation dtype (fp32; fp64 for fp64);
  // z_rk = scale key_scale_k <x_r,keys_k> + bias_k -> (lse [R], out [R,e] = sum_k softmax_k(z_r) value_scale_k
  // values_k), both in the accumulation dtype.
  m.def("dino_softmax_rows(Tensor x, Tensor keys, Tensor key_scale, Tensor values, Tensor value_scale, Tensor bias, "
        "float scale) -> (Tensor lse, Tensor out)");
  // The transpose product, added in place: out [K,e] += sum_r exp(z_rk - lse_r) y_r; lse [R], y [R,e] and out
  // (contiguous) in the accumulation dtype. Neither stores the [R,K] logits nor a [K,e] buffer of its own.
  m.def("dino_softmax_columns(Tensor x, Tensor keys, Tensor key_scale, Tensor bias, float scale, Tensor lse, "
        "Tensor y, Tensor(a!) out) -> ()");

  // nn_topk (vitfast/ops/nn_topk.py): queries [B,d], queue [Q,d] (one dtype), query_ids [B], queue_ids [Q] int64
  // -> (values [B,k] accumulation dtype, indices [B,k] int64): each query's k most similar entries whose id differs
  // from its own, similarity descending, ties by the lower queue index. No [B,Q] similarities stored.
  m.def("nn_topk(Tensor queries, Tensor queue, Tensor query_ids, Tensor queue_ids, int k) -> (Tensor, Tensor)");

  // self_attention (vitfast/ops/self_attention.py): qkv [B,N,3*H*d] contiguous, the qkv projection's output packed as
  // [B,N,3,H,d] -> (out [B,N,H*d] in qkv's dtype = softmax(q k^T scale) v per head, heads side by side; lse [B,H,N] in
  // the accumulation dtype). No [B,H,N,N] tensor stored.
  m.def("self_attention_forward(Tensor qkv, int num_heads, float scale) -> (Tensor, Tensor)");
  // d_qkv [B,N,3*H*d] in qkv's dtype, the probabilities recomputed from qkv and lse.
  m.def("self_attention_backward(Tensor grad_out, Tensor qkv, Tensor lse, int num_heads, float scale) -> Tensor");
}
