"""A hand-written forward pass for Llama-family models (SmolLM2, Llama, Mistral-style).

Why: at batch 1 on two CPU cores, a transformers forward costs more in per-op dispatch and
wrappers (attention interface, mask and cache plumbing, separate q/k/v and gate/up
matmuls) than the math needs, and its weights can only be fp32 or bf16. This module reads
the weights of a loaded transformers model once and runs the same computation in far fewer
ops:

* q, k and v in one matmul; gate and up in one matmul; ``F.rms_norm``;
* rotary embeddings from a table computed once by the model's own rotary module (so every
  position-only rope variant matches transformers exactly);
* attention with ``scaled_dot_product_attention(enable_gqa=True)`` straight on the
  engine's slot cache (:class:`inference.backends.torch.SlotKVCache` tensors);
* weights in one of four formats: ``float32`` (the reference), ``bfloat16``, ``int8``
  (weight-only, one scale per output channel, bf16 activations, through torch's
  ``_weight_int8pack_mm`` CPU kernel): a quarter of fp32's bytes, which is what a batch-1
  step on CPU is bound by; or ``int4`` (groups of 32 with a scale and a zero each, as GGUF Q4_1,
  ``_weight_int4pack_mm_for_cpu``, the output head kept int8): an eighth;
* the output projection optionally *rescored*: computed in the low format, then the top-k
  logits of each row recomputed from the fp32 weights (see ``torch_head.py``).

:func:`unsupported_reason` says when a model is outside what this covers (the engine then
keeps the transformers forward). torch is imported inside functions only.
"""

from __future__ import annotations

from typing import Any

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")
INT4_GROUP = 32
_MODEL_TYPES = ("llama", "mistral", "qwen2")
_POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported_reason(config: Any) -> str | None:
    """None when :class:`FusedLlama` computes what transformers computes for ``config``."""
    model_type = getattr(config, "model_type", "")
    if model_type not in _MODEL_TYPES:
        return f"model type {model_type!r} is not one of {_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "mlp_bias", False):
        return "the MLP has biases"
    if getattr(config, "attention_bias", False) and model_type != "qwen2":
        return "the attention projections have biases"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = "default"
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _POSITION_ONLY_ROPE:
        return f"rope type {rope_type!r} depends on more than the position"
    return None


def quantize_int8(weight: Any) -> tuple[Any, Any]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None]``."""
    import torch

    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


def quantize_int4(weight: Any, group: int = INT4_GROUP) -> tuple[Any, Any]:
    """Asymmetric int4 in groups of ``group`` input columns, packed for torch's CPU kernel
    (``_weight_int4pack_mm_for_cpu``): ``weight ~= (q - 8) * scale + zero`` per group.
    Returns the packed weight and the ``[K / group, N, 2]`` bf16 scales and zeros."""
    import torch

    n, k = weight.shape
    if k % group:
        raise ValueError(f"{k} input columns are not a multiple of the group size {group}")
    w = weight.detach().float().view(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    zero = low + 8 * scale
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(q.view(n, k).contiguous(), 1)
    return packed, scales_zeros.to(torch.bfloat16)


class _Linear:
    """A bias-optional projection in one of :data:`WEIGHT_FORMATS`."""

    def __init__(self, weight: Any, bias: Any, fmt: str, act_dtype: Any) -> None:
        import torch

        if fmt == "int4" and weight.shape[1] % INT4_GROUP:
            fmt = "int8"  # the int4 kernel needs whole groups; int8 takes any shape
        self.fmt = fmt
        self.bias = None if bias is None else bias.detach().to(act_dtype)
        if fmt == "int4":
            self.weight, self.scale = quantize_int4(weight)
        elif fmt == "int8":
            self.weight, scale = quantize_int8(weight)
            self.scale = scale.to(act_dtype)
        else:
            dtype = torch.float32 if fmt == "float32" else torch.bfloat16
            self.weight = weight.detach().to(dtype).contiguous()
            self.scale = None

    def __call__(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        if self.fmt == "int4":
            out = torch._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scale)
        elif self.fmt == "int8":
            out = torch._weight_int8pack_mm(x, self.weight, self.scale)
        else:
            out = F.linear(x.to(self.weight.dtype), self.weight)
        return out if self.bias is None else out + self.bias


class _Layer:
    def __init__(self, layer: Any, fmt: str, act_dtype: Any) -> None:
        import torch

        attn, mlp = layer.self_attn, layer.mlp
        qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        qkv_b = None if biases[0] is None else torch.cat(biases)
        self.qkv = _Linear(qkv_w, qkv_b, fmt, act_dtype)
        self.o = _Linear(attn.o_proj.weight, attn.o_proj.bias, fmt, act_dtype)
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        self.gate_up = _Linear(gate_up, None, fmt, act_dtype)
        self.down = _Linear(mlp.down_proj.weight, None, fmt, act_dtype)
        self.norm_in = layer.input_layernorm.weight.detach().to(act_dtype)
        self.norm_post = layer.post_attention_layernorm.weight.detach().to(act_dtype)


class FusedLlama:
    """The forward pass of a Llama-family ``*ForCausalLM`` in :data:`WEIGHT_FORMATS`.

    ``prefill`` and ``decode`` read and write the engine's slot cache the way its
    transformers path does (``SlotKVCache.update``): packed prompts write K/V at
    ``[row, :, position]`` and attend over their own new K/V; a decode step writes one
    token per row and attends over ``[:rows, :, :kv_len]``.

    Formats: ``float32`` keeps transformers' numbers (identical greedy outputs, tested);
    ``int8`` and ``int4`` are batch-invariant (a request's greedy output does not depend on
    its batch mates, tested); ``bfloat16`` is neither (its matmul at one row differs from its matmul
    at many), which is why it is an option and not a default.
    """

    def __init__(
        self,
        model: Any,
        *,
        weights: str = "float32",
        rescore_k: int = 0,
        max_positions: int,
        device: str = "cpu",
    ) -> None:
        import torch

        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, not {weights!r}")
        reason = unsupported_reason(model.config)
        if reason is not None:
            raise ValueError(f"the fused forward does not cover this model: {reason}")
        if weights in ("int8", "int4") and device != "cpu":
            raise ValueError(f"{weights} weights run on CPU only")
        cfg = model.config
        self.weights = weights
        self.act_dtype = torch.float32 if weights == "float32" else torch.bfloat16
        # Attention and the KV cache stay fp32 on CPU: bf16 attention there is 4-7x slower
        # (no fused bf16 kernel for these shapes) and the cache is small next to the weights.
        self.attn_dtype = torch.float32 if device == "cpu" else self.act_dtype
        # int8 matmuls give a row the same bits whatever the batch; batched attention does
        # not (its reductions depend on the padded length), so low-precision formats on
        # CPU attend row by row and batched greedy output stays the single-request output.
        # fp32 rounds finely enough that batched attention kept it identical (tested).
        self.batch_invariant = device == "cpu" and weights != "float32"
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.eps = float(cfg.rms_norm_eps)
        self.layers = [_Layer(layer, weights, self.act_dtype) for layer in model.model.layers]
        self.embed = model.model.embed_tokens.weight.detach()  # fp32 rows, gathered per token
        self.norm = model.model.norm.weight.detach().to(self.act_dtype)
        head_w = model.lm_head.weight.detach()
        self.rescore_k = rescore_k
        self.exact_head = head_w if rescore_k else None
        # The head is a quarter of the weights and decides every token. Rescored, its
        # top-k are redone in fp32, so a coarse head only has to keep the best token in
        # its top-k; unrescored, an int4 body keeps an int8 head.
        head_fmt = weights
        if weights == "float32" and rescore_k:
            head_fmt = "bfloat16"
        elif weights == "int4" and not rescore_k:
            head_fmt = "int8"
        self.head = _Linear(head_w, None, head_fmt, self.act_dtype)
        self.cos, self.sin = _rope_table(model, max_positions, device, self.attn_dtype)

    @property
    def cache_dtype(self) -> Any:
        return self.attn_dtype

    # -- the two passes ----------------------------------------------------------------
    def prefill(
        self,
        ids: Any,
        positions: Any,
        rows: Any,
        spans: list[tuple[int, int]],
        keys: list,
        values: list,
    ) -> Any:
        """``ids``/``positions``/``rows``: [T] packed prompt tokens; ``spans``: each
        prompt's ``(start, end)`` in the packed row. Returns the logits at each prompt's
        last token ([len(spans), vocab]).

        Matmuls run over the packed row; attention runs per prompt (causal over exactly
        its own tokens), so a prompt's numbers do not depend on what it was packed with."""
        import torch
        import torch.nn.functional as F

        T = ids.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        x, rope = self._embed(ids, positions)
        for i, layer in enumerate(self.layers):
            q, k, v = self._project(layer, x, rope, keys[i], values[i], rows, positions)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, T, D]
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[None, :, a:b],
                        k[None, :, a:b],
                        v[None, :, a:b],
                        is_causal=True,
                        enable_gqa=KV != H,
                    )[0]
                    for a, b in spans
                ],
                dim=1,
            )
            x = self._rest(layer, x, out.transpose(0, 1).reshape(T, H * D).to(x.dtype))
        last = torch.tensor([b - 1 for _, b in spans], device=ids.device)
        return self._logits(x[last])

    def decode(
        self,
        ids: Any,
        positions: Any,
        rows: Any,
        mask: Any,
        keys: list,
        values: list,
    ) -> Any:
        """One token per row: ``ids``/``positions``/``rows``: [B]; ``mask``: [B, 1, 1, L]
        (True = attend; L = the attended cache length). Returns [B, vocab].

        With :attr:`batch_invariant`, attention runs row by row over exactly that row's
        own length (``position + 1``), so a row's numbers are the ones it would get alone."""
        import torch
        import torch.nn.functional as F

        B, L = ids.shape[0], mask.shape[-1]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        lengths = (positions + 1).tolist() if self.batch_invariant else None
        x, rope = self._embed(ids, positions)
        for i, layer in enumerate(self.layers):
            q = self._project(layer, x, rope, keys[i], values[i], rows, positions)[0][:, :, None]
            if lengths is not None:
                parts = [
                    F.scaled_dot_product_attention(
                        q[r : r + 1],
                        keys[i][r : r + 1, :, :n],
                        values[i][r : r + 1, :, :n],
                        enable_gqa=KV != H,
                    )
                    for r, n in enumerate(lengths)
                ]
                out = parts[0] if len(parts) == 1 else torch.cat(parts)
            else:
                out = F.scaled_dot_product_attention(
                    q,
                    keys[i][:B, :, :L],
                    values[i][:B, :, :L],
                    attn_mask=mask,
                    enable_gqa=KV != H,
                )
            x = self._rest(layer, x, out.reshape(B, H * D).to(x.dtype))
        return self._logits(x)

    # -- pieces ------------------------------------------------------------------------
    def _embed(self, ids: Any, positions: Any) -> tuple[Any, tuple[Any, Any]]:
        """The tokens' embeddings and their rope rows (cos, signed sin)."""
        x = self.embed[ids].to(self.act_dtype)
        return x, (self.cos[positions][:, None], self.sin[positions][:, None])

    def _project(
        self,
        layer: _Layer,
        x: Any,
        rope: tuple[Any, Any],
        layer_keys: Any,
        layer_values: Any,
        rows: Any,
        positions: Any,
    ) -> tuple[Any, Any, Any]:
        """q, k and v of ``x`` (one token per row of ``x``), rope applied; k and v are
        also written into the layer's cache at ``[rows, :, positions]``."""
        import torch.nn.functional as F

        n = x.shape[0]
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        qkv = layer.qkv(F.rms_norm(x, (x.shape[-1],), layer.norm_in, self.eps))
        qkv = qkv.to(self.attn_dtype)
        qk = _rotate(qkv[:, : (H + KV) * D].view(n, H + KV, D), *rope)  # q and k at once
        k, v = qk[:, H:], qkv[:, (H + KV) * D :].view(n, KV, D)
        layer_keys[rows, :, positions] = k
        layer_values[rows, :, positions] = v
        return qk[:, :H], k, v

    def _rest(self, layer: _Layer, x: Any, attn: Any) -> Any:
        import torch.nn.functional as F

        x = x + layer.o(attn)
        h = F.rms_norm(x, (x.shape[-1],), layer.norm_post, self.eps)
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up)

    def _logits(self, x: Any) -> Any:
        import torch.nn.functional as F

        from inference.backends.torch_head import rescore_top_k

        hidden = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
        logits = self.head(hidden).float()
        if not self.rescore_k:
            return logits
        return rescore_top_k(logits, hidden, self.exact_head, self.rescore_k)


def _rotate(x: Any, cos: Any, signed_sin: Any) -> Any:
    """transformers' ``x * cos + rotate_half(x) * sin`` in fewer ops: ``rotate_half(x)``
    is ``roll(x, half)`` with the first half negated, and the sign lives in the table
    (negation is exact, so the numbers are the same)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _rope_table(model: Any, positions: int, device: str, dtype: Any) -> tuple[Any, Any]:
    """cos and sign-folded sin (see :func:`_rotate`) for positions ``0..positions-1``,
    from the model's own rotary module."""
    import torch

    rotary = model.model.rotary_emb
    pos = torch.arange(positions, device=device)[None]
    probe = torch.zeros(1, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, pos)
    half = sin.shape[-1] // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()
