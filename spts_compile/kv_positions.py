"""Which original positions a compacted KV cache holds, and the per-layer decode masks built from them.

An SPTS prefill leaves each skipping layer's cache with only the tokens it kept (at their original RoPE
positions), while the model's own decode mask assumes every layer holds every position. So:

- **The side table.** After a prefill that compacts the cache, the runner registers each compacted layer's
  returned K tensor with its kept positions [B, L] (cache indices, i.e. columns of the 2D attention mask) and
  `seen`, the number of positions the sequence has (the index of the next token). After every decode or
  continuation call it registers the new K outputs (old positions, then the new tokens' positions, cut to the
  tail the cache keeps for sliding layers). Entries are keyed by the tensor object and dropped when it dies.
  A K tensor made outside a model call (beam search's `index_select`, `repeat_interleave`, a deep copy) is
  recognised row by row from its newest entry, which it copies exactly; anything else that does not fit a
  dense cache raises `CompactedCacheError`.
- **The mask op.** transformers' "sdpa" and "eager" attention functions are wrapped
  (`install_attention_masks`, at import) so that an attention that reads a cache (more keys than queries)
  passes its mask through `spts::layer_mask`. This has to happen while Dynamo traces the model: the model's
  one mask does not even broadcast against a shorter layer's keys, so the trace itself would fail. During a
  call whose cache is compacted, the runner publishes every layer's positions, the call's 2D attention mask
  and the windows in a call context; the op builds the layer's mask from them: the key at position p is
  visible from the query at position t iff p <= t, p is a real token, and on sliding layers t - p < window.
  With no context (a dense cache) the op returns the model's own mask, so dense decoding is exactly Hugging
  Face's, and it raises when that cache is one an SPTS prefill compacted (recognised from its newest row).
  The op is opaque to Dynamo/Inductor; its fake impl gives the shape [B, 1|H, q, L + q] from its inputs.
  It also takes the attention's own sliding window (a cache that records its past does not show it).
- **Crop.** `DynamicCache.crop(-r)` is wrapped (`install_cache_crop`) so that on a compacted cache it forgets the
  last r positions, not each layer's last r rows, and registers what each layer keeps; a crop no cache tensor can
  hold (rows of a padded batch left with different counts) raises CompactedCacheError.
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass

import torch


class CompactedCacheError(ValueError):
    """A compacted KV cache reached a call that cannot decode it correctly: raised, never a wrong answer."""


@dataclass
class Entry:
    positions: torch.Tensor     # [B, L] long: the original position of each cache row
    seen: int                   # positions in the sequence so far (the next token's position)
    last_key: torch.Tensor      # [B, H, hd]: the newest cache row, to recognise rows copied elsewhere
    compacted: bool             # the layer holds fewer rows than a dense cache would


# id(tensor) -> (weakref, layer, Entry)
_TABLE: dict[int, tuple] = {}
# layer -> the most recent entries it registered (kept after their tensors die, for beam search's reorder)
_RECENT: dict[int, deque] = {}
_RECENT_SIZE = 4


def _drop(key):
    def callback(_ref):
        item = _TABLE.get(key)
        if item is not None and item[0] is _ref:
            del _TABLE[key]
    return callback


def register(k: torch.Tensor, layer: int, positions: torch.Tensor, seen: int, window: int = 0) -> None:
    """Record that cache tensor `k` ([B, H, L, hd]) of `layer` holds `positions` [B, L]."""
    dense_len = seen if not window else min(seen, window - 1)
    entry = Entry(positions=positions, seen=int(seen), last_key=k[:, :, -1].detach().clone(),
                  compacted=k.shape[2] < dense_len or not _is_tail(positions, seen))
    key = id(k)
    _TABLE[key] = (weakref.ref(k, _drop(key)), layer, entry)
    _RECENT.setdefault(layer, deque(maxlen=_RECENT_SIZE)).append(entry)


def _is_tail(positions: torch.Tensor, seen: int) -> bool:
    l = positions.shape[1]
    return bool((positions == torch.arange(seen - l, seen, device=positions.device)).all())


def lookup(k: torch.Tensor) -> tuple[int, Entry] | None:
    item = _TABLE.get(id(k))
    if item is None or item[0]() is not k:
        return None
    return item[1], item[2]


def is_compacted(t) -> bool:
    found = isinstance(t, torch.Tensor) and lookup(t)
    return bool(found) and found[1].compacted


def recognise(k: torch.Tensor, layer: int) -> Entry | None:
    """An entry for a K tensor the table does not know, whose rows are exact copies of rows of a cache this
    layer wrote recently (beam search's reorder, num_return_sequences' expansion, a deep copy). None when no
    recent cache fits; CompactedCacheError when rows match caches with different positions."""
    for entry in reversed(_RECENT.get(layer, ())):
        if entry.positions.shape[1] != k.shape[2] or tuple(entry.last_key.shape[1:]) != (k.shape[1], k.shape[3]):
            continue
        new_last = k[:, :, -1]
        rows = []
        for b in range(k.shape[0]):
            same = [j for j in range(entry.last_key.shape[0]) if torch.equal(entry.last_key[j], new_last[b])]
            if not same:
                break
            pos = entry.positions[same[0]]
            if any(not torch.equal(entry.positions[j], pos) for j in same[1:]):
                raise CompactedCacheError(
                    f"spts: layer {layer}'s compacted KV cache was rebuilt outside the model and its rows cannot be "
                    "told apart; the positions they hold are ambiguous")
            rows.append(same[0])
        else:
            idx = torch.tensor(rows, device=entry.positions.device)
            return Entry(positions=entry.positions.index_select(0, idx), seen=entry.seen,
                         last_key=new_last.detach().clone(), compacted=entry.compacted)
    return None


# ---------------------------------------------------------------------------------------------
# The call context: the positions of every layer during one call of a graph on a compacted cache
# ---------------------------------------------------------------------------------------------
_CONTEXT = threading.local()


class call_context:
    """`with call_context(layers, seen, padding, windows): compiled(*args)`; layers: layer -> positions [B, L];
    padding: the call's 2D attention mask [B, seen + q] (None: every position is real); windows: layer ->
    sliding window (0: none)."""

    def __init__(self, layers: dict[int, torch.Tensor] | None, seen: int | None, padding=None, windows=None):
        self.value = None if layers is None else (layers, seen, padding, windows or {})

    def __enter__(self):
        self.saved = getattr(_CONTEXT, "value", None)
        _CONTEXT.value = self.value

    def __exit__(self, *exc):
        _CONTEXT.value = self.saved


def visible(key_pos: torch.Tensor, query_pos: torch.Tensor, real: torch.Tensor | None, window: int) -> torch.Tensor:
    """[B, q, K] bool: key position p visible from query position t iff p <= t, p real, and t - p < window
    (window 0: none). A query always sees itself (a padding query would otherwise see nothing)."""
    p, t = key_pos[:, None, :], query_pos[:, :, None]
    ok = p <= t
    if real is not None:
        ok = ok & real[:, None, :]
    if window:
        ok = ok & (t - p < window)
    return ok | (p == t)


@torch.library.custom_op("spts::layer_mask", mutates_args=())
def layer_mask(key: torch.Tensor, mask: torch.Tensor, layer: int, window: int) -> torch.Tensor:
    """The mask of `layer` for its keys [B, H, K, hd] (the past rows, then the q new ones), shaped and typed like
    the model's own mask [B|1, 1|H, q, W]. On a dense cache (no call context) it is the model's mask as it is.
    On a compacted cache (the runner publishes each layer's positions, the call's 2D attention mask and the
    layers' windows) it is built from the positions: the model's mask is sized by one layer's cache (transformers
    takes the first full-attention layer's length), which is wrong for every layer of another length.
    `window` is the attention's own sliding window (0: none), which the layer's cache does not show when it
    records its past (assisted decoding): it then holds more rows than the window, and the attention reads the
    newest of them."""
    b, k_len, q, w = key.shape[0], key.shape[2], mask.shape[-2], mask.shape[-1]
    ctx = getattr(_CONTEXT, "value", None)
    if ctx is None:
        if _from_compacted(key, q, layer):
            raise CompactedCacheError(
                f"spts: layer {layer} is decoding on a KV cache that an SPTS prefill compacted, outside a graph the "
                "spts backend compiled for it (uncompiled, another backend, or a fallback): its mask would be "
                "wrong; decode with the same compiled model")
        if w != k_len:
            raise CompactedCacheError(
                f"spts: layer {layer}'s KV cache holds {k_len - q} rows where the model's mask expects {w - q}: it "
                "was compacted by an SPTS prefill, and only a graph compiled with the spts backend knows which "
                "positions it holds; decode with the same compiled model")
        return mask.expand(b, *mask.shape[1:]).clone()
    layers, seen, padding, windows = ctx
    past = k_len - q
    window = window or windows.get(layer, 0)
    pos = layers.get(layer)
    if pos is None:  # a dense layer: its newest `past` positions
        pos = torch.arange(seen - past, seen, device=mask.device).expand(b, past)
    elif window and pos.shape[1] > past:   # a sliding cache that records its past: attention reads its newest rows
        pos = pos[:, pos.shape[1] - past:]
    if tuple(pos.shape) != (b, past):
        raise CompactedCacheError(f"spts: layer {layer}: positions {tuple(pos.shape)} for a cache of {b}x{past} rows")
    new = torch.arange(seen, seen + q, device=mask.device).expand(b, q)
    key_pos = torch.cat([pos.to(mask.device), new], dim=1)
    real = None
    if padding is not None:
        if padding.shape[1] != seen + q:
            raise CompactedCacheError(f"spts: the attention_mask has {padding.shape[1]} columns; the compacted cache "
                                      f"holds a sequence of {seen} positions and {q} new tokens: give {seen + q}")
        real = padding.to(mask.device).bool().gather(1, key_pos)
    ok = visible(key_pos, new, real, window)[:, None].expand(b, mask.shape[1], q, k_len)
    if mask.dtype == torch.bool:
        return ok.contiguous()
    return torch.zeros(ok.shape, dtype=mask.dtype, device=mask.device).masked_fill(~ok, torch.finfo(mask.dtype).min)


@layer_mask.register_fake
def _(key, mask, layer, window):
    return mask.new_empty((key.shape[0], mask.shape[1], mask.shape[-2], key.shape[2]))


def _from_compacted(key: torch.Tensor, q: int, layer: int) -> bool:
    """Whether the past rows of `key` are as many as a compacted cache this layer wrote recently and end with its
    newest row. (The row alone is not enough: at the first skipping layer a dense cache of the same prompt ends
    with the very same row, the last token's K computed from the same dense input.)"""
    past = key.shape[2] - q
    if past <= 0:
        return False
    newest = key[:, :, past - 1]
    return any(e.compacted and e.positions.shape[1] == past and e.last_key.shape == newest.shape
               and torch.equal(e.last_key, newest) for e in _RECENT.get(layer, ()))


# ---------------------------------------------------------------------------------------------
# Hugging Face attention functions: give each layer its own mask on a cache
# ---------------------------------------------------------------------------------------------
def _with_layer_mask(inner_of):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and key.shape[-2] > query.shape[-2]:
            attention_mask = torch.ops.spts.layer_mask(key, attention_mask, getattr(module, "layer_idx", -1),
                                                       int(kwargs.get("sliding_window") or 0))
        return inner_of(module)(module, query, key, value, attention_mask, *args, **kwargs)
    attention.spts_layer_mask = True
    return attention


def _module_eager(module):
    import sys
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise CompactedCacheError(f"spts: no eager attention function found for {type(module).__name__}")
    return fn


def install_attention_masks() -> bool:
    """Wrap transformers' "sdpa" and "eager" attention functions so that an attention that reads a cache (more
    keys than queries) takes its mask through `spts::layer_mask`: the model's mask on a dense cache, the
    layer's own on a compacted one. Returns False where transformers has no attention registry."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    sdpa = mapping.get("sdpa")
    if sdpa is not None and not getattr(sdpa, "spts_layer_mask", False):
        mapping["sdpa"] = _with_layer_mask(lambda module, fn=sdpa: fn)
    if not getattr(mapping.get("eager"), "spts_layer_mask", False):
        mapping["eager"] = _with_layer_mask(_module_eager)
    return True


# ---------------------------------------------------------------------------------------------
# DynamicCache.crop: forget positions, not rows
# ---------------------------------------------------------------------------------------------
def _known_entry(k, layer: int) -> Entry | None:
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        return None
    found = lookup(k)
    return found[1] if found is not None and found[0] == layer else recognise(k, layer)


def crop_compacted(cache, tokens_to_remove: int, inner) -> None:
    """`DynamicCache.crop(-r)` on a cache an SPTS prefill may have compacted: forget the sequence's last r
    positions. Hugging Face removes each layer's last r rows, which on a compacted layer are r positions only when
    the layer holds all of them (tokens added after the prefill); here each compacted layer removes the rows whose
    positions are >= seen - r, and the side table learns the positions of what is left. A crop that would leave
    the rows of a batch with different numbers of entries (a padded batch cropped into its prompt) raises
    CompactedCacheError, the cache untouched. `inner` is Hugging Face's crop (a cache that is not compacted)."""
    layers = getattr(cache, "layers", None)
    if layers is None:   # transformers without cache layers: refuse on a compacted cache, else theirs
        keys = getattr(cache, "key_cache", None) or []
        if any(is_compacted(k) for k in keys):
            raise CompactedCacheError("spts: DynamicCache.crop on a compacted KV cache needs transformers 5's "
                                      "cache layers; crop a cache from a prefill with use_cache=False instead")
        return inner(cache, tokens_to_remove)
    found = {}
    for i, layer in enumerate(layers):
        entry = _known_entry(getattr(layer, "keys", None), i)
        if entry is not None and entry.compacted:
            found[i] = entry
    if not found:
        return inner(cache, tokens_to_remove)
    if tokens_to_remove > 0:
        raise CompactedCacheError(f"spts: DynamicCache.crop({tokens_to_remove}) on a compacted KV cache: pass minus "
                                  "the number of tokens to remove (transformers 5's crop)")
    seens = {e.seen for e in found.values()}
    if len(seens) > 1:
        raise CompactedCacheError(f"spts: DynamicCache.crop on a compacted KV cache whose layers come from "
                                  f"different sequences (lengths {sorted(seens)})")
    r, seen = -tokens_to_remove, seens.pop()
    new_seen = seen - r
    if new_seen < 1:
        raise CompactedCacheError(f"spts: DynamicCache.crop({tokens_to_remove}) would remove all {seen} positions "
                                  "of a compacted KV cache")
    drop = {}
    for i, entry in found.items():
        gone = (entry.positions >= new_seen).sum(dim=1)
        if bool((gone != gone[0]).any()):
            raise CompactedCacheError(
                f"spts: DynamicCache.crop({tokens_to_remove}) forgets positions {new_seen}..{seen - 1}, of which the "
                f"rows of layer {i}'s compacted KV cache hold {gone.tolist()}: the rows would keep different numbers "
                "of entries, which one cache tensor cannot hold. Crop only tokens added after the SPTS prefill "
                "(every layer holds all of those), or crop a batch of one")
        drop[i] = int(gone[0])
    for i, layer in enumerate(layers):   # each layer's own crop (sliding layers restrict to their window too)
        layer.crop(-drop[i] if i in drop else tokens_to_remove)
    for i, entry in found.items():
        layer = layers[i]
        if isinstance(getattr(layer, "cumulative_length", None), int):
            layer.cumulative_length = new_seen   # a sliding layer counts positions; its crop counted rows
        k = layer.keys
        left = entry.positions.shape[1] - drop[i]        # the layer's crop kept old rows ..left-1 (their tail)
        register(k, i, entry.positions[:, left - k.shape[2]:left], new_seen, getattr(layer, "sliding_window", 0) or 0)


def install_cache_crop() -> bool:
    """Make `DynamicCache.crop` forget positions on a compacted cache (`crop_compacted`); unchanged on any other.
    Returns False where transformers has no DynamicCache."""
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:
        return False
    inner = DynamicCache.crop
    if getattr(inner, "spts_crop", False):
        return True

    def crop(self, tokens_to_remove: int) -> None:
        return crop_compacted(self, tokens_to_remove, inner)
    crop.spts_crop = True
    crop.__doc__ = inner.__doc__
    DynamicCache.crop = crop
    return True
