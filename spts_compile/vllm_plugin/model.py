"""The two mix-ins that turn a vLLM decoder model into its SPTS variant (llama.py, qwen2.py).

`SPTSDecoderLayer` goes before a vLLM decoder-layer class: on a pure-prefill step, a skipping layer runs
`prefill.spts_layer`; otherwise the layer is vLLM's. `SPTSCausalLM` goes before a vLLM `...ForCausalLM` class: it
reads the options at load, builds the LTP proxies once the weights are loaded, and on each step decides, outside
the compiled region, whether the step is a pure prefill. Dense steps take vLLM's path unchanged (its compiled
graph when compilation is on); an SPTS step runs the model's forward eagerly (`ForwardContext.skip_compiled`), so
the one-trace graph never holds a data-dependent branch.
"""
from __future__ import annotations

import logging
import time

from . import options_from_env, prefill

logger = logging.getLogger("vllm.spts_compile")


class SPTSDecoderLayer:
    """Mixed in before a vLLM decoder layer: SPTS at skipping layers of pure-prefill steps."""

    def __init__(self, *args, prefix: str = "", **kwargs):
        super().__init__(*args, prefix=prefix, **kwargs)
        self.spts_index = int(prefix.rsplit(".", 1)[-1])
        self.spts_setup: prefill.Setup | None = None          # set by SPTSCausalLM when skipping is on

    def forward(self, positions, hidden_states, residual, **kwargs):
        step, setup = prefill.current_step, self.spts_setup
        if step is None or setup is None or self.spts_index < setup.schedule.start_layer:
            return super().forward(positions, hidden_states, residual, **kwargs)
        return prefill.spts_layer(self, step, setup, positions, hidden_states, residual)


class SPTSCausalLM:
    """Mixed in before a vLLM ForCausalLM class whose `self.model.layers` are SPTSDecoderLayers. The concrete
    class calls `_spts_init(vllm_config)` at the end of its __init__."""

    spts_setup: prefill.Setup | None = None

    def _spts_init(self, vllm_config) -> None:
        name = type(self).__name__
        opts = options_from_env()
        if opts is None:
            logger.info("spts: %s loaded, skipping off (vLLM's dense model)", name)
            return
        hf_config = vllm_config.model_config.hf_config.get_text_config()
        cfg = prefill.plugin_config(opts)                   # refuses what the plugin cannot honour
        schedule = cfg.resolve(hf_config.num_hidden_layers)
        prefill.check_model(cfg, hf_config, self._spts_layers())
        if vllm_config.scheduler_config.enable_chunked_prefill:
            logger.warning("spts: chunked prefill is on, so a step cannot tell a whole prompt from its first "
                           "chunk; SPTS stays off. Pass enable_chunked_prefill=False and "
                           "max_num_batched_tokens >= max_model_len to run it.")
            return
        par = vllm_config.parallel_config
        if par.pipeline_parallel_size > 1 or par.tensor_parallel_size > 1:
            logger.warning("spts: the plugin runs on one rank only; SPTS stays off")
            return
        if vllm_config.cache_config.enable_prefix_caching:
            logger.warning("spts: prefix caching is on: blocks written by an SPTS prefill (K/V of tokens whose "
                           "hidden states skipped layers) can be reused by a later request with the same prefix")
        from spts_compile.selectors import get as get_selector
        self.spts_setup = setup = prefill.Setup(cfg, schedule, get_selector(cfg.selector), hf_config.hidden_act)
        for layer in self._spts_layers():
            layer.spts_setup = setup
        logger.info("spts: %s loaded, skipping on: selector %s, start_layer %d of %d, stage_ends %s, budgets %s, "
                    "prune %s, pap %s, ltp %s, msdp %s, probe_queries %d, heads %s, pool %d %s, sink %d, "
                    "window %d, min_tokens %d, kv_cache %s", name, cfg.selector, schedule.start_layer,
                    schedule.depth, schedule.stage_ends, schedule.budgets, schedule.prune, schedule.pap,
                    schedule.ltp, schedule.msdp, schedule.probe_queries, schedule.heads, schedule.pool,
                    schedule.pool_kind, schedule.sink, schedule.window, schedule.min_tokens, schedule.kv_cache)

    def _spts_layers(self) -> list:
        return [l for l in self.model.layers if isinstance(l, SPTSDecoderLayer)]

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        setup = self.spts_setup
        # The proxies come from the weights as loaded: vLLM's CPU linears repack them and drop the originals
        # afterwards (process_weights_after_loading).
        if setup is not None and setup.schedule.ltp and setup.selector.uses_proxy:
            t = time.perf_counter()
            setup.proxies.update(prefill.build_proxies(setup.cfg, setup.schedule, self._spts_layers()))
            logger.info("spts: LTP proxies of %d layers built from the %s in %.2f s", len(setup.proxies),
                        "calibration" if setup.cfg.calibration is not None else "weights",
                        time.perf_counter() - t)
        return loaded

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        segments = None
        if self.spts_setup is not None and intermediate_tensors is None:
            segments = prefill.pure_prefill_segments(positions.shape[0])
        if segments is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        from vllm.forward_context import get_forward_context
        ctx = get_forward_context()
        was = ctx.skip_compiled
        step = prefill.new_step(segments, self.spts_setup.schedule, positions.device)
        prefill.current_step = step
        ctx.skip_compiled = True
        try:
            logger.info("spts: pure-prefill step %d: %d request(s), %s tokens; SPTS from layer %d", step.index,
                        len(segments), [e - s for s, e in segments], self.spts_setup.schedule.start_layer)
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            ctx.skip_compiled = was
            prefill.current_step = None
            prefill.flush_records(step)
