"""LTP calibration: rank each FFN channel, and build the low-rank proxy that predicts `||FFN(x)||`.

LTP (see SEMANTICS.md, "FFN (LTP)") skips the FFN for tokens whose FFN output would be small. To
rank tokens without running the full FFN it evaluates a cheap proxy

    proxy(x) = down'( act(gate_out(gate_in(x))) * up_out(up_in(x)) )

built once per model from the FFN's own weights:

1. Keep the `D_low` most important FFN channels. Importance comes either from calibration data (the
   mean of a channel's top-rho saliencies over real tokens, `calibrate`) or, without data, from the
   weights alone (`channel_importance_from_weights`).
2. Replace the pruned gate and up matrices by rank-r factors from a truncated SVD.

Everything here runs eagerly, outside any traced graph; only `proxy_norm` is meant to be traced.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import families

FORMAT_TAG = "spts-calibration"
FORMAT_VERSION = 1

# The activations the proxy knows, by the names `proxy_norm` accepts.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
}



# ---------------------------------------------------------------------------------------------
# The proxy
# ---------------------------------------------------------------------------------------------
@dataclass
class LTPProxy:
    """The low-rank proxy of one FFN, in `torch.nn.functional.linear` weight convention."""

    gate_in: Tensor    # [r, D]
    gate_out: Tensor   # [D_low, r]
    up_in: Tensor      # [r, D]
    up_out: Tensor     # [D_low, r]
    down: Tensor       # [D, D_low]
    channels: Tensor   # LongTensor [D_low], the kept FFN channels, ascending
    mode: str          # "calibration" or "weights": where the channel ranking came from

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The five weights in the order `proxy_norm` expects them."""
        return (self.gate_in, self.gate_out, self.up_in, self.up_out, self.down)

    @property
    def rank(self) -> int:
        return self.gate_in.shape[0]


def channel_importance_from_weights(w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Data-free channel importance: `||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]||`, float32 [I].

    A channel's output is bounded by the product of the norms of the three weight vectors it
    touches, so this ranks channels by how large they can possibly get."""
    _check_ffn_shapes(w_gate, w_up, w_down)
    with torch.no_grad():
        # dtype= accumulates in float32 without materialising a float32 copy of the whole matrix.
        gate = torch.linalg.vector_norm(w_gate.detach(), dim=1, dtype=torch.float32)
        up = torch.linalg.vector_norm(w_up.detach(), dim=1, dtype=torch.float32)
        down = torch.linalg.vector_norm(w_down.detach(), dim=0, dtype=torch.float32)
        return gate * up * down


def build_ltp_proxy(w_gate: Tensor, w_up: Tensor, w_down: Tensor, *, channels: int, rank: int,
                    importance: Tensor | None = None) -> LTPProxy:
    """Build the LTP proxy of one FFN (`w_gate`, `w_up`: [I, D]; `w_down`: [D, I]).

    Keeps the top `channels` channels by `importance` (by the weights-only ranking when None),
    then factors the pruned gate and up matrices with a rank-`rank` truncated SVD. `channels` is
    clamped to I and `rank` to min(D_low, D), so a too-large request means "as exact as possible"."""
    _check_ffn_shapes(w_gate, w_up, w_down)
    _check_positive_int("channels", channels)
    _check_positive_int("rank", rank)
    width, hidden = w_gate.shape
    mode = "weights" if importance is None else "calibration"
    if importance is None:
        importance = channel_importance_from_weights(w_gate, w_up, w_down)
    elif tuple(importance.shape) != (width,):
        raise ValueError(f"spts: importance has shape {tuple(importance.shape)} but the FFN has {width} "
                         f"channels; expected shape ({width},)")

    with torch.no_grad():
        kept = top_channels(importance, min(channels, width))
        kept_dev = kept.to(w_gate.device)
        r = min(rank, kept.numel(), hidden)
        gate_in, gate_out = _low_rank_factors(w_gate.detach()[kept_dev], r)
        up_in, up_out = _low_rank_factors(w_up.detach()[kept_dev], r)
        down = w_down.detach()[:, kept_dev].contiguous()
    return LTPProxy(gate_in=gate_in, gate_out=gate_out, up_in=up_in, up_out=up_out, down=down,
                    channels=kept, mode=mode)


def top_channels(importance: Tensor, count: int) -> Tensor:
    """The `count` most important channels as an ascending CPU LongTensor.

    A stable descending sort breaks ties towards the lower index, so equal scores give the same
    channels on every run and every device (torch.topk makes no such promise)."""
    scores = importance.detach().to(device="cpu", dtype=torch.float32)
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count].sort().values


def _low_rank_factors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-`rank` factors (inner [rank, D], outer [D_low, rank]) with outer @ inner ~= matrix.

    The truncated SVD comes from the eigen-decomposition of the smaller Gram matrix, in float64: the
    proxy is only ever a product of the two factors, so the singular vectors' signs do not matter, and
    `eigh` of a [D_low, D_low] matrix is several times cheaper than a full SVD (this runs once per
    skipping layer at every compile). The singular values are split as sqrt on both sides so neither
    factor carries all the scale, which keeps the factors well inside the range of the weights' dtype."""
    a = matrix.detach().to(torch.float64)
    wide = a.shape[0] <= a.shape[1]
    gram = a @ a.T if wide else a.T @ a
    evals, evecs = torch.linalg.eigh(gram)                  # ascending
    evals, evecs = evals.flip(0)[:rank].clamp(min=0), evecs.flip(1)[:, :rank]
    s = evals.sqrt()
    # Directions with a zero singular value contribute nothing; keep them exactly zero.
    inv = torch.where(s > s.max() * 1e-12, 1.0 / s.clamp(min=1e-300), torch.zeros_like(s))
    root = s.sqrt()
    if wide:   # evecs = U [D_low, r]; V^T = diag(1/s) U^T A
        outer = evecs * root[None, :]
        inner = (root * inv)[:, None] * (evecs.T @ a)
    else:      # evecs = V [D, r]; U = A V diag(1/s)
        inner = root[:, None] * evecs.T
        outer = (a @ evecs) * (root * inv)[None, :]
    return inner.to(matrix.dtype).contiguous(), outer.to(matrix.dtype).contiguous()


def proxy_norm(x: Tensor, proxy_tensors: Sequence[Tensor], act: str) -> Tensor:
    """`||proxy(x)||_2` over the hidden dim: [..., N, D] -> [..., N], in float32.

    The norm accumulates in float32 because the squares of half-precision activations overflow
    float16 long before the activations themselves do; the scores only feed a top-k."""
    if act not in ACTIVATIONS:
        raise ValueError(f"spts: unknown LTP activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    gate_in, gate_out, up_in, up_out, down = proxy_tensors
    gate = F.linear(F.linear(x, gate_in), gate_out)
    up = F.linear(F.linear(x, up_in), up_out)
    out = F.linear(ACTIVATIONS[act](gate) * up, down)
    return torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)


def proxy_act(hidden_act: str) -> str:
    """Map a Hugging Face `config.hidden_act` onto the activation name `proxy_norm` accepts."""
    try:
        return families.HF_ACTIVATIONS[hidden_act]
    except KeyError:
        raise ValueError(f"spts: LTP does not support the FFN activation {hidden_act!r}; supported: "
                         f"{sorted(families.HF_ACTIVATIONS)}") from None


def _check_ffn_shapes(w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> None:
    if w_gate.dim() != 2 or tuple(w_up.shape) != tuple(w_gate.shape):
        raise ValueError(f"spts: gate and up weights must both be [I, D], got {tuple(w_gate.shape)} "
                         f"and {tuple(w_up.shape)}")
    width, hidden = w_gate.shape
    if tuple(w_down.shape) != (hidden, width):
        raise ValueError(f"spts: down weight must be [D, I] = ({hidden}, {width}), got {tuple(w_down.shape)}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"spts: {name} must be an int >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Finding the FFNs of a model
# ---------------------------------------------------------------------------------------------
def _fused_gate_up(module: nn.Module) -> nn.Linear | None:
    """The module's fused gate/up projection, under any name the family table gives one (Phi-3's
    `gate_up_proj`)."""
    for name in sorted(families.fused_names("fused_gate_up")):
        if isinstance(getattr(module, name, None), nn.Linear):
            return getattr(module, name)
    return None


def is_gated_mlp(module: nn.Module) -> bool:
    """True for a gated FFN: Linear `gate_proj` + `up_proj` + `down_proj`, or a fused gate/up projection
    (as the family table names it) + `down_proj`."""
    def linear(name: str) -> bool:
        return isinstance(getattr(module, name, None), nn.Linear)

    separate = linear("gate_proj") and linear("up_proj")
    return linear("down_proj") and (separate or _fused_gate_up(module) is not None)


def find_mlps(model: nn.Module) -> list[nn.Module]:
    """The FFN module of each decoder layer, in layer order.

    The usual layout is `model.model.layers[i].mlp`; anything else falls back to a scan for gated
    FFN modules in registration order (which is layer order), not descending into a match so a
    FFN's own children are never counted twice."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        mlps = [getattr(layer, "mlp", None) for layer in layers]
        if all(isinstance(m, nn.Module) and is_gated_mlp(m) for m in mlps):
            return mlps
    found: list[nn.Module] = []
    _collect_mlps(model, found)
    return found


def _collect_mlps(module: nn.Module, found: list[nn.Module]) -> None:
    if is_gated_mlp(module):
        found.append(module)
        return
    for child in module.children():
        _collect_mlps(child, found)


def mlp_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(W_gate [I, D], W_up [I, D], W_down [D, I]) of a gated FFN, splitting a fused gate_up_proj
    (first half gate, second half up, as Phi-3 chunks it)."""
    if not is_gated_mlp(mlp):
        raise ValueError(f"spts: {type(mlp).__name__} is not a gated FFN (gate_proj/up_proj/down_proj)")
    if isinstance(getattr(mlp, "gate_proj", None), nn.Linear):
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    gate, up = _fused_gate_up(mlp).weight.chunk(2, dim=0)
    return gate, up, mlp.down_proj.weight


def mlp_activation(mlp: nn.Module) -> Callable[[Tensor], Tensor]:
    """The FFN's activation module (`act_fn`, or Phi-3's `activation_fn`)."""
    for name in ("act_fn", "activation_fn"):
        fn = getattr(mlp, name, None)
        if callable(fn):
            return fn
    raise ValueError(f"spts: {type(mlp).__name__} has no act_fn/activation_fn; cannot compute channel saliency")


def channel_saliency(mlp: nn.Module, x: Tensor) -> Tensor:
    """Per-token channel saliency `|act(x W_gate^T) * (x W_up^T)|` as float32 [tokens, I].

    It calls the FFN's own projections so biases (and any Linear subclass's own forward) are
    honoured exactly as in the model's forward."""
    x = x.reshape(-1, x.shape[-1])
    if isinstance(getattr(mlp, "gate_proj", None), nn.Linear):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    else:
        gate, up = _fused_gate_up(mlp)(x).chunk(2, dim=-1)
    return (mlp_activation(mlp)(gate) * up).abs().float()


# ---------------------------------------------------------------------------------------------
# Calibration results
# ---------------------------------------------------------------------------------------------
class Calibration:
    """Per-FFN-layer channel importance measured on calibration text, and how it was measured."""

    def __init__(self, importance: Sequence[Tensor], hidden_size: int, rho: float, num_tokens: int,
                 model_type: str | None = None) -> None:
        self.importance = [t.detach().to(device="cpu", dtype=torch.float32).contiguous() for t in importance]
        self.hidden_size = int(hidden_size)
        self.rho = float(rho)
        self.num_tokens = int(num_tokens)
        self.model_type = model_type

    def __repr__(self) -> str:
        widths = sorted({t.numel() for t in self.importance})
        return (f"Calibration(layers={self.num_layers}, hidden_size={self.hidden_size}, widths={widths}, "
                f"rho={self.rho}, num_tokens={self.num_tokens}, model_type={self.model_type!r})")

    @property
    def num_layers(self) -> int:
        return len(self.importance)

    def importance_for(self, layer: int) -> Tensor:
        """Channel importance of FFN layer `layer`, float32 [I_layer]."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"spts: calibration has FFN layers 0..{self.num_layers - 1}, no layer {layer}")
        return self.importance[layer]

    def check_fits(self, num_layers: int, hidden_size: int, intermediate_sizes: Sequence[int],
                   family: str | None = None) -> None:
        """Raise ValueError naming what differs between this calibration and a model's FFNs (and its family,
        when both are known to the family table)."""
        bad = [i for i, t in enumerate(self.importance) if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"spts: the calibration's importance has NaN or infinite values in FFN layer(s) {bad}")
        mine = families.for_model_type(self.model_type)
        if family is not None and mine is not None and family != "generic" and mine.name != family:
            raise ValueError(f"spts: the calibration was made for a {self.model_type!r} model, not a {family} one")
        if num_layers != self.num_layers or len(intermediate_sizes) != self.num_layers:
            raise ValueError(f"spts: the calibration covers {self.num_layers} FFN layers but the model has "
                             f"{num_layers} (with {len(intermediate_sizes)} FFN widths given); it was made "
                             f"for a different model")
        if hidden_size != self.hidden_size:
            raise ValueError(f"spts: the calibration was made for hidden size {self.hidden_size} but the "
                             f"model's hidden size is {hidden_size}")
        wrong = [f"layer {i}: calibration {t.numel()} vs model {w}"
                 for i, (t, w) in enumerate(zip(self.importance, intermediate_sizes)) if t.numel() != w]
        if wrong:
            raise ValueError(f"spts: the calibration's FFN widths do not match the model's: {'; '.join(wrong)}")

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_TAG, "version": FORMAT_VERSION, "importance": list(self.importance),
                "hidden_size": self.hidden_size, "rho": self.rho, "num_tokens": self.num_tokens,
                "model_type": self.model_type}

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` atomically: a crash mid-write leaves the old file, never a truncated one."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".spts-calibration-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.to_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Read a file written by `save`. Anything else raises ValueError saying what is wrong."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"spts: calibration file {path!r} does not exist")
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        try:
            # weights_only: a calibration file is data, and loading must never run pickled code. A backend call
            # runs inside Dynamo's tracing context, whose fake mode makes torch.load return data-less meta
            # tensors: load outside it.
            with torch._guards.tracing(None), unset_fake_temporarily():
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the zip/pickle layers raise many different types for a bad file
            raise ValueError(f"spts: {path!r} is not a readable calibration file "
                             f"({type(e).__name__}: {_first_line(e)})") from None
        return cls.from_dict(payload, source=path)

    @classmethod
    def from_dict(cls, payload: Any, source: str = "<dict>") -> "Calibration":
        problem = _payload_problem(payload)
        if problem:
            raise ValueError(f"spts: {source!r} is not a valid SPTS calibration file: {problem}")
        return cls(importance=payload["importance"], hidden_size=payload["hidden_size"], rho=payload["rho"],
                   num_tokens=payload["num_tokens"], model_type=payload["model_type"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def _payload_problem(payload: Any) -> str | None:
    """What is wrong with a loaded calibration dict, or None when it is well formed."""
    if not isinstance(payload, dict):
        return f"expected a dict, found {type(payload).__name__}"
    if payload.get("format") != FORMAT_TAG:
        return f"format tag is {payload.get('format')!r}, expected {FORMAT_TAG!r}"
    if payload.get("version") != FORMAT_VERSION:
        return f"format version {payload.get('version')!r} is not supported (this version reads {FORMAT_VERSION})"
    missing = [k for k in ("importance", "hidden_size", "rho", "num_tokens", "model_type") if k not in payload]
    if missing:
        return f"missing field(s) {missing}"
    importance = payload["importance"]
    if not isinstance(importance, list) or not importance:
        return "importance must be a non-empty list of tensors"
    for i, t in enumerate(importance):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() == 0 or not t.is_floating_point():
            return f"importance[{i}] must be a non-empty 1-D float tensor"
    if not _is_int(payload["hidden_size"]) or payload["hidden_size"] < 1:
        return f"hidden_size must be a positive int, found {payload['hidden_size']!r}"
    rho = payload["rho"]
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        return f"rho must be a number in (0, 1], found {rho!r}"
    if not _is_int(payload["num_tokens"]) or payload["num_tokens"] < 1:
        return f"num_tokens must be a positive int, found {payload['num_tokens']!r}"
    if payload["model_type"] is not None and not isinstance(payload["model_type"], str):
        return f"model_type must be a str or None, found {payload['model_type']!r}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve_calibration(value: Any) -> Calibration | None:
    """Accept what `SPTSConfig.calibration` may hold: None, a Calibration, or a path to a saved one."""
    if value is None or isinstance(value, Calibration):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Calibration.load(value)
    raise ValueError(f"spts: calibration must be a Calibration, a path to a saved one, or None; "
                     f"got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Measuring importance
# ---------------------------------------------------------------------------------------------
class TopKMean:
    """Running per-channel mean of the k largest values seen, in O(k * channels) memory.

    Each update merges the new values into a buffer holding the best k so far; the k largest of
    the union are the k largest overall, so the final mean is exact, not an estimate."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.best: Tensor | None = None   # [<= k, channels]
        self.count = 0

    def update(self, values: Tensor) -> None:
        """Fold in `values` [tokens, channels]."""
        self.count += values.shape[0]
        pool = values if self.best is None else torch.cat([self.best, values], dim=0)
        keep = min(self.k, pool.shape[0])
        self.best = pool.topk(keep, dim=0, sorted=False).values

    def mean(self) -> Tensor:
        if self.best is None:
            raise RuntimeError("spts: TopKMean.mean() called before any update")
        return self.best.mean(dim=0)


def top_rho_count(rho: float, total: int) -> int:
    """k = ceil(rho * total), at least 1. Exact rational arithmetic, so 0.1 * 30 is 3, not 4."""
    return max(1, math.ceil(Fraction(rho).limit_denominator(1 << 16) * total))


def prepare_batches(data: Sequence[Any], tokenizer: Any, max_length: int) -> list[Tensor]:
    """Turn calibration `data` into [B, T] LongTensor batches, all tokenized up front so the total
    token count (and with it the top-k size) is known before the model runs."""
    if isinstance(data, (str, Tensor)) or not isinstance(data, Sequence):
        raise ValueError("spts: calibration data must be a list of strings or of token tensors "
                         f"([T] or [B, T]), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("spts: calibration data is empty")
    batches = []
    for i, item in enumerate(data):
        batch = _as_batch(item, i, tokenizer, max_length)
        if batch.numel() > 0:   # an empty string contributes no tokens, and a model cannot run on none
            batches.append(batch)
    if not batches:
        raise ValueError("spts: calibration data contains no tokens")
    return batches


def _as_batch(item: Any, index: int, tokenizer: Any, max_length: int) -> Tensor:
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError("spts: calibration data holds strings; pass tokenizer= to tokenize them")
        ids = tokenizer(item, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        return ids.long()
    if isinstance(item, Tensor):
        if item.dtype.is_floating_point or item.dtype.is_complex or item.dtype == torch.bool or item.dim() not in (1, 2):
            raise ValueError(f"spts: calibration data item {index} must be an integer token tensor [T] or "
                             f"[B, T], got {item.dtype} {tuple(item.shape)}")
        batch = item.long() if item.dim() == 2 else item.long()[None]
        return batch[:, :max_length]
    raise ValueError(f"spts: calibration data item {index} is a {type(item).__name__}; expected a str or "
                     f"a token tensor")


def _progress(batches: list[Tensor], enabled: bool):
    """Iterate over batches with a tqdm bar, or one stderr line per batch without tqdm."""
    if not enabled:
        yield from batches
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    total = sum(b.numel() for b in batches)
    if tqdm is not None:
        with tqdm(total=total, unit="tok", desc="spts calibration") as bar:
            for batch in batches:
                yield batch
                bar.update(batch.numel())
        return
    done = 0
    for i, batch in enumerate(batches):
        yield batch
        done += batch.numel()
        print(f"spts calibration: batch {i + 1}/{len(batches)}, {done}/{total} tokens", file=sys.stderr, flush=True)


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra forward arguments that save work: no KV cache, and logits for one position only (the
    full [B, T, vocab] logits are large and the calibration never reads them)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    kwargs = {}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def calibrate(model: nn.Module, data: Sequence[Any], *, tokenizer: Any = None, rho: float = 0.2,
              max_length: int = 2048, progress: bool = True) -> Calibration:
    """Measure each FFN channel's importance on calibration `data`.

    `data` is a list of strings (tokenized with `tokenizer`, truncated to `max_length`) or of token
    tensors ([T] or [B, T]). A channel's importance is the mean of the top `rho` fraction of its
    per-token saliencies `|act(x W_gate^T) * (x W_up^T)|` over all calibration tokens; the top rho
    rather than the plain mean, because a channel that fires strongly on a few tokens matters.

    Memory: each FFN keeps a float32 buffer of k = ceil(rho * total tokens) values per channel on
    the model's device, so the cost grows with the calibration set, not with the batch size."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        raise ValueError(f"spts: rho must be a number in (0, 1], got {rho!r}")
    _check_positive_int("max_length", max_length)
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(f"spts: found no gated FFN (gate_proj/up_proj/down_proj or gate_up_proj/down_proj) "
                         f"in {type(model).__name__}; LTP calibration needs one per decoder layer")
    for mlp in mlps:
        mlp_activation(mlp)   # fail before the run, not inside a hook
    batches = prepare_batches(data, tokenizer, max_length)
    total = sum(b.numel() for b in batches)
    trackers = [TopKMean(top_rho_count(rho, total)) for _ in mlps]
    _run_with_hooks(model, mlps, trackers, batches, progress)
    for i, tracker in enumerate(trackers):
        # Every token passes every FFN once; anything else means the hooks saw a different model.
        if tracker.count != total:
            raise RuntimeError(f"spts: FFN layer {i} saw {tracker.count} tokens during calibration, expected {total}")
    return Calibration(importance=[t.mean() for t in trackers], hidden_size=mlps[0].down_proj.out_features,
                       rho=rho, num_tokens=total, model_type=getattr(getattr(model, "config", None), "model_type", None))


def _run_with_hooks(model: nn.Module, mlps: list[nn.Module], trackers: list[TopKMean], batches: list[Tensor],
                    progress: bool) -> None:
    """Run every batch through the model eagerly, feeding each FFN's input saliency to its tracker."""
    def make_hook(tracker: TopKMean):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            tracker.update(channel_saliency(module, x))
        return hook

    was_training = model.training
    handles = [mlp.register_forward_hook(make_hook(t), with_kwargs=True) for mlp, t in zip(mlps, trackers)]
    device = _model_device(model)
    kwargs = _forward_kwargs(model)
    try:
        model.eval()   # dropout would perturb the saliencies
        with torch.no_grad():
            for batch in _progress(batches, progress):
                model(input_ids=batch.to(device), **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
