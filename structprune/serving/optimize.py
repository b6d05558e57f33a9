"""``sp.optimize(model, dtype)``: a pruned (or dense) BERT-layout model as a module ready for CPU inference.

    fast = sp.optimize(model, dtype=torch.bfloat16)   # model: compacted, patched-with-masks, or plain HF
    out = fast(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out.start_logits, out.end_logits                  # fp32, shapes as the model's

What it accepts (decided here, documented in README "Serving a pruned model"):
- a compacted structprune model (``sp.compact``, ``sp.from_pretrained``): served at its per-layer sizes, its
  hidden width and without the whole sublayers it skips (``patch(..., sublayers=True, hidden=True)``, issue 27);
- a patched model whose gates are still masked or fractional: compacted on a copy first (a UserWarning says so;
  the outputs are the masked model's, the model passed in is not touched);
- a plain Hugging Face model (never patched): served dense, as it is.
Families: BERT, RoBERTa, ELECTRA, XLM-RoBERTa with a question-answering head (``...ForQuestionAnswering``) or none
(``...Model``: returns ``last_hidden_state`` only, no pooler output). dtype: ``torch.float32`` or
``torch.bfloat16``; the model stays on the CPU. Anything else is a TypeError/ValueError that says what was expected.

The returned module holds its own copies of the weights (reordered for oneDNN, in ``dtype``), so later changes to
``model`` do not reach it; it runs under ``torch.inference_mode`` and has no gradients.
"""
from __future__ import annotations

import copy
import threading
import warnings

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, QuestionAnsweringModelOutput

from structprune.model.modules import sublayer_closed
from structprune.serving.encoder import ACTIVATIONS, PackedLinear, ServingLayer
from structprune.serving.embeddings import ServingEmbeddings
from structprune.serving.threads import pool

DTYPES = (torch.float32, torch.bfloat16)
MIN_ROWS = 16  # a batch of one sequence is split over the threads only with at least this many tokens per thread
LAYOUT = ("bert", "roberta", "electra", "xlm-roberta")  # encoder.layer[i].attention.self.query ... output.LayerNorm


class ServingModel(nn.Module):
    """What :func:`optimize` returns: called like the model (``input_ids``, ``attention_mask``,
    ``token_type_ids``), returning ``QuestionAnsweringModelOutput`` (or ``BaseModelOutput`` for a bare encoder)."""

    def __init__(self, embeddings: ServingEmbeddings, layers: list[ServingLayer], qa_outputs: nn.Linear | None,
                 dtype: torch.dtype, source: str):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.qa_outputs = qa_outputs
        self.dtype, self.source = dtype, source
        self.threads: int | None = None  # None: torch.get_num_threads() at each call
        self.batch_parallel = True  # split a batch over the threads (see structprune.serving.threads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **other):
        unsupported = sorted(k for k, v in other.items() if v is not None and k != "return_dict")
        if unsupported:
            raise TypeError(f"the optimized model takes input_ids, attention_mask and token_type_ids; got "
                            f"{unsupported} as well (position_ids, head_mask, inputs_embeds, ... are not supported)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [batch, sequence] tensor, got "
                             f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)} like input_ids, got "
                                 f"{tuple(t.shape)}")
        batch, seq = input_ids.shape
        threads = self.threads or torch.get_num_threads()
        workers = pool(threads) if self.batch_parallel else None
        if workers is None or (batch == 1 and seq < MIN_ROWS * threads):
            out = self._forward(input_ids, attention_mask, token_type_ids)
        elif batch == 1:  # one sequence: its rows split over the threads, one exchange of K/V per layer
            out = self._forward_rows(input_ids, attention_mask, token_type_ids, workers, threads)
        else:  # one contiguous chunk of the batch per worker thread (see structprune.serving.threads)
            n = min(threads, batch)
            chunks = [torch.tensor_split(t, n) if t is not None else [None] * n
                      for t in (input_ids, attention_mask, token_type_ids)]
            out = torch.cat(list(workers.map(lambda args: self._forward(*args), zip(*chunks))))
        if self.qa_outputs is None:
            return BaseModelOutput(last_hidden_state=out)
        return QuestionAnsweringModelOutput(start_logits=out[..., 0].contiguous(), end_logits=out[..., 1].contiguous())

    @torch.inference_mode()
    def _forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """Logits ``[batch, seq, 2]`` (or the last hidden state) in fp32, for one chunk of the batch."""
        batch, seq = input_ids.shape
        h = self.embeddings(input_ids, token_type_ids)  # [batch * seq, hidden] in the serving dtype
        mask = self._mask(attention_mask, batch, seq)
        for layer in self.layers:
            h = layer(h, mask, batch, seq)
        if self.qa_outputs is None:
            return h.view(batch, seq, -1).float()
        return self.qa_outputs(h).float().view(batch, seq, 2)

    def _forward_rows(self, input_ids, attention_mask, token_type_ids, workers, n: int) -> torch.Tensor:
        """A batch of one sequence on ``n`` worker threads, each owning a contiguous block of its rows (tokens):
        GEMMs, LayerNorms and its queries' attention run per block; the K/V rows are exchanged once per layer
        (:meth:`ServingLayer.forward_rows`). Worker 0 computes the embeddings first (one more barrier)."""
        seq = input_ids.shape[1]
        bounds = [(seq * i) // n for i in range(n + 1)]
        barrier = threading.Barrier(n)
        shared: dict = {}

        def work(i: int) -> torch.Tensor:
            try:
                with torch.inference_mode():
                    if i == 0:
                        shared["h"] = self.embeddings(input_ids, token_type_ids)
                        shared["mask"] = self._mask(attention_mask, 1, seq)
                        shared["qkv"] = [torch.empty(seq, 3 * layer.heads * layer.head_dim, dtype=self.dtype)
                                         for layer in self.layers]
                    barrier.wait()
                    h, mask = shared["h"][bounds[i]:bounds[i + 1]], shared["mask"]
                    for layer, qkv_all in zip(self.layers, shared["qkv"]):
                        h = layer.forward_rows(h, mask, seq, bounds[i], qkv_all, barrier)
                    return h.float() if self.qa_outputs is None else self.qa_outputs(h).float()
            except BaseException:
                barrier.abort()  # the other workers leave their wait with BrokenBarrierError instead of hanging
                raise

        return torch.cat(list(workers.map(work, range(n)))).view(1, seq, -1)

    def _mask(self, attention_mask, batch: int, seq: int) -> torch.Tensor | None:
        """The additive key bias ``[batch, seq]`` in fp32 (0 = attend, the serving dtype's finfo.min = padding: exact
        in fp32), or None when nothing is padded; built once per call for every layer's attention."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        mask = torch.zeros(batch, seq)
        return mask.masked_fill_(attention_mask.view(batch, seq) == 0, torch.finfo(self.dtype).min)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, source={self.source}, batch_parallel={self.batch_parallel}"


def _check(model, dtype) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"optimize: dtype must be one of {DTYPES}, got {dtype!r} (int8 is not supported)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUT:
        raise TypeError(f"optimize supports models of type {LAYOUT} (a question-answering head or none); got "
                        f"{type(model).__name__} with model_type={model_type!r}")
    base = getattr(model, "base_model", None)
    heads = [n for n, m in model.named_children() if m is not base and n != "qa_outputs"]
    if base is None or (base is not model and heads):
        raise TypeError(f"optimize supports a question-answering head (qa_outputs) or a bare encoder; "
                        f"{type(model).__name__} has {heads}")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"optimize serves on the CPU; the model's parameters are on {sorted(devices)}: call "
                         "model.to('cpu') first")
    if getattr(model.config, "hidden_act", None) not in ACTIVATIONS:
        raise TypeError(f"optimize supports hidden_act in {tuple(ACTIVATIONS)}; got "
                        f"{getattr(model.config, 'hidden_act', None)!r}")


def _prepared(model: nn.Module) -> tuple[nn.Module, str]:
    """The model to read weights from: compacted (a copy, when gates are still masked or fractional)."""
    from structprune.model.compaction import compact
    from structprune.model.io import is_standalone_exportable
    from structprune.model.patching import is_patched

    if not is_patched(model):
        return model, "dense (not patched)"
    if is_standalone_exportable(model):
        return model, "compacted"
    warnings.warn("optimize: the model still has masked or fractional gates; serving a compacted copy (call "
                  "sp.compact(model) first to silence this)", UserWarning, stacklevel=3)
    return compact(copy.deepcopy(model)), "compacted copy"


def optimize(model: nn.Module, dtype: torch.dtype = torch.float32, *, packed: bool = True,
             pad_units: int | None = None) -> ServingModel:
    """A :class:`ServingModel` computing ``model``'s outputs (eval mode) in ``dtype`` on the CPU.

    ``dtype=torch.float32``: within 1e-5 of the model. ``torch.bfloat16``: weights and activations in bf16 with
    fp32 accumulation (oneDNN, AVX512-BF16/AMX where the CPU has them), embeddings and logits in fp32.
    ``packed=False`` keeps plain ``F.linear`` GEMMs (no oneDNN reorder), for comparison. ``pad_units``: pad each
    layer's FFN units with zeros to a multiple of it (outputs unchanged; default 32 in bf16, the K of an AMX tile,
    measured 2-10% faster at B8 x L128; 1, no padding, in fp32, where it measured no gain).
    """
    _check(model, dtype)
    if pad_units is None:
        pad_units = 32 if dtype == torch.bfloat16 else 1
    if not isinstance(pad_units, int) or pad_units < 1:
        raise ValueError(f"optimize: pad_units must be a positive int, got {pad_units!r}")
    model, source = _prepared(model)
    config = model.config
    base = model.base_model
    head_dim = config.hidden_size // config.num_attention_heads
    layers = []
    for layer in base.encoder.layer:
        attention = layer.attention
        parts = {"query": attention.self.query, "key": attention.self.key, "value": attention.self.value,
                 "attn_out": attention.output.dense, "ln1": attention.output.LayerNorm,
                 "ffn_in": layer.intermediate.dense, "ffn_out": layer.output.dense, "ln2": layer.output.LayerNorm}
        heads = parts["query"].out_features // head_dim
        layers.append(ServingLayer(parts, heads, head_dim, ACTIVATIONS[config.hidden_act], dtype, packed, pad_units,
                                   skip_attention=sublayer_closed(getattr(attention, "sublayer_gate", None)),
                                   skip_ffn=sublayer_closed(getattr(layer.intermediate, "sublayer_gate", None))))
    embeddings = copy.deepcopy(base.embeddings).float().eval().requires_grad_(False)
    project = getattr(base, "embeddings_project", None)  # ELECTRA with embedding_size != hidden_size
    project = copy.deepcopy(project).float().eval().requires_grad_(False) if project is not None else None
    qa = getattr(model, "qa_outputs", None)
    if qa is not None:
        qa = PackedLinear(qa, dtype, packed=False)
    return ServingModel(ServingEmbeddings(embeddings, project, dtype, config), layers, qa, dtype, source).eval()
