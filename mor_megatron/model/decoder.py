"""The MoR decoder: megatron's `TransformerBlock` with a recursion loop in place of its layer loop.

`self.layers` holds the unique layers this stage needs, keyed by their global index, so parameter
names (`decoder.layers.5.mlp...`) are the same at every pipeline layout. A shared layer is one
module called at every recursion: its parameters are one `Parameter` each and autograd sums their
gradients over all uses.

With a router, each recursion step gathers its active tokens from the `[S, B, D]` residual stream,
runs the shared block on them only (so its matmuls and attention see k_r tokens, not S) and
scatters the result back (`model/token_set.py`; a variable count per sequence is padded per
sequence on the local backend, packed on TE: docs/DESIGN.md 4.1):
  expert-choice: H <- H + g * f(H) at the selected tokens (f includes the block's residuals);
  token-choice:  tokens run ungated while their depth lasts, then H = H_1 + g * F_depth(H_1).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import get_pg_rank
from torch import Tensor, nn

from mor_megatron.config import MoRConfig
from mor_megatron.model.routing import (
    ExpertChoiceRouter,
    RouterOutput,
    TokenChoiceRouter,
    expert_choice_losses,
    expert_choice_step_stats,
    token_choice_losses,
    weighted_aux_loss,
)
from mor_megatron.model.rules import (
    ROUTING_MODES,
    Unit,
    decoder_units,
    expert_choice_select,
    token_choice_capacity_limit,
    token_choice_combine,
    token_choice_drop,
    token_choice_runs,
    unit_layers,
)
from mor_megatron.model.specs import get_mor_block_spec
from mor_megatron.model.precision import checkpoint_layer, fp8_align_size, fp8_context, pad_active_tokens
from mor_megatron.model.token_set import TokenSet
from mor_megatron.model.boundary import RoutingState, pack_state, unpack_state


class GlobalLayers(nn.ModuleDict):
    """Layers keyed by global index; iterates over modules like megatron's `nn.ModuleList`."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, index) -> nn.Module:
        return super().__getitem__(str(index))


class MoRDecoder(TransformerBlock):
    def __init__(
        self,
        config: MoRConfig,
        backend: str = "local",
        pre_process: bool = True,
        post_process: bool = True,
        units: Optional[list[Unit]] = None,
        pg_collection=None,
        vp_stage: Optional[int] = None,
    ) -> None:
        # read by _build_layers, which megatron's constructor calls
        self.units = list(units) if units is not None else decoder_units(config)
        super().__init__(
            config=config,
            spec=get_mor_block_spec(config.num_layers, backend),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.plan = config.recursion_plan
        steps = [unit.index for unit in self.units if unit.kind == "recursion"]
        if config.router == "expert_choice":
            self.routers = nn.ModuleDict({str(r): ExpertChoiceRouter(config) for r in steps})
        elif config.router == "token_choice" and 0 in steps:
            self.router = TokenChoiceRouter(config)
        self.router_output: Optional[RouterOutput] = None
        # pipeline replicas of the shared block, by global index (`parallel.setup.parallelize`)
        self.replica_layers: frozenset[str] = frozenset()
        # layout of a step with a variable token count per sequence (docs/DESIGN.md 4.1): padded
        # per sequence for SDPA, packed (thd, cu_seqlens) for Transformer Engine
        self.varlen_layout = "packed" if backend == "te" else "padded"
        # variable steps padded to one of `token_buckets` sizes (0: not padded), so a compiled
        # layer sees a bounded set of token counts (`parallel/compile.py`)
        self.token_buckets = 0

    def set_token_buckets(self, buckets: int) -> None:
        """Pad variable steps' token counts up to one of `buckets` sizes (0: no padding)."""
        self.token_buckets = int(buckets)

    def _varlen_tokens(self, mask: Tensor) -> TokenSet:
        """The `[S, B]` mask's tokens in this decoder's variable layout. Padded sets bucket
        their row count m to a multiple of ceil(S / token_buckets); packed sets get their
        buckets in `_pad_multiple`."""
        if self.varlen_layout == "packed":
            return TokenSet.packed(mask)
        multiple = -(-mask.shape[0] // self.token_buckets) if self.token_buckets else 1
        return TokenSet.padded(mask, multiple)

    def _build_layers(self) -> None:
        offset = get_transformer_layer_offset(
            self.config, self.vp_stage, get_pg_rank(self.pg_collection.pp)
        )
        spec = self.submodules.layer_specs[0] if self.submodules.layer_specs else None
        self.layers = GlobalLayers(
            {
                # megatron adds the stage offset itself; layer_number stays global index + 1
                str(index): build_module(
                    spec,
                    config=self.config,
                    layer_number=index + 1 - offset,
                    pg_collection=self.pg_collection,
                    vp_stage=self.vp_stage,
                )
                for index in unit_layers(self.config, self.units)
            }
        )
        self.final_layernorm = None
        if self.has_final_layernorm_in_this_stage():
            self.final_layernorm = build_module(
                self.submodules.layer_norm,
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """Dist-checkpoint keys by global layer index (`decoder.layers.{i}.`), one copy of the
        shared block: the layers in `replica_layers` (set by `parallel.setup.parallelize` on the
        pipeline stages holding a later replica) are marked non-main."""
        replica_layers = self.replica_layers
        state = {}
        for key, layer in self.layers.items():
            layer_state = layer.sharded_state_dict(f"{prefix}layers.{key}.", (), metadata)
            if key in replica_layers:
                for value in layer_state.values():
                    if isinstance(getattr(value, "replica_id", None), tuple):
                        value.replica_id = (1,) + tuple(value.replica_id[1:])
            state.update(layer_state)
        for name, module in self.named_children():
            if module is not self.layers:
                state.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                    )
                )
        return state

    # -- layer calls -------------------------------------------------------------------------

    def _pad_multiple(self, tokens: TokenSet, hidden: Tensor) -> int:
        """Token-count multiple a step's gathered tokens are padded to: FP8 GEMMs need 16 (or 32);
        packed steps under compile go to one of `token_buckets` sizes."""
        align = fp8_align_size(self.config)
        if tokens.layout != "packed" or not self.token_buckets:
            return align
        bucket = -(-hidden.shape[0] * hidden.shape[1] // self.token_buckets)
        return -(-bucket // align) * align

    def _rows_run(self, tokens: TokenSet, hidden: Tensor) -> Tensor:
        """Token rows the block runs on for `tokens`, pads included (a 0-dim tensor, as the
        other router statistics, on the stream's device)."""
        if tokens.count == 0:
            rows = 0
        else:
            multiple = self._pad_multiple(tokens, hidden)
            width = 1 if tokens.layout == "packed" else tokens.index.shape[1]
            rows = -(-tokens.index.shape[0] // multiple) * multiple * width
        # a fill on the device, not a host-to-device copy (which would sync on CUDA)
        return torch.full((), float(rows), dtype=torch.float32, device=hidden.device)

    def _run_layers(
        self, layers, hidden: Tensor, rotary: Optional[Tensor], mask=None, multiple: int = 1
    ) -> Tensor:
        count = hidden.shape[0]
        if multiple > 1 and mask is not None:  # pads at the tail, sliced off below
            hidden, rotary, mask = pad_active_tokens(hidden, rotary, mask, multiple)
        for index in layers:
            layer = self.layers[index]
            with fp8_context(self.config, "layer", layer.layer_number):  # non-delayed recipes
                if self.config.recompute_granularity == "full" and self.training:
                    hidden = checkpoint_layer(self.config, self._call_layer_at, index, layer, hidden, rotary, mask)
                else:
                    hidden = self._call_layer_at(index, layer, hidden, rotary, mask)
        return hidden[:count]

    def _call_layer_at(self, index, layer, hidden: Tensor, rotary: Optional[Tensor], mask) -> Tensor:
        # the layer's own KV store, taken inside the (recomputed) call: `ActiveTokens.for_layer`
        return self._call_layer(layer, hidden, rotary, None if mask is None else mask.for_layer(index))

    @staticmethod
    def _call_layer(layer, hidden: Tensor, rotary: Optional[Tensor], mask) -> Tensor:
        return layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)[0]

    def _run_block_on(
        self, tokens: TokenSet, hidden: Tensor, rotary: Optional[Tensor], kv_store: dict, r: int
    ) -> Tensor:
        """The shared block on `tokens` only, at their original positions (recursion step r)."""
        if tokens.count == 0:  # no token recursed this deep: nothing to run
            return tokens.gather(hidden)
        kv_role = "none"
        if self.config.kv_mode == "share_first":
            kv_role = "write" if r == 0 else "read"
        context = tokens.attention_context(kv_store, kv_role)
        return self._run_layers(
            self.plan.block, tokens.gather(hidden), tokens.rotary(rotary), context,
            self._pad_multiple(tokens, hidden),
        )

    # -- recursion steps ----------------------------------------------------------------------

    def _dp_group(self):
        group = getattr(self.pg_collection, "dp", None)
        return group if group is not None and group.size() > 1 else None

    def _expert_choice_step(
        self, r: int, state: RoutingState, rotary, mode: str, kv_store: dict, out: RouterOutput,
        losses: dict, record: bool,
    ) -> RoutingState:
        """Recursion step r, expert-choice: select among the previous step's tokens, run the
        block on them, H <- H + g * f(H) there (`rules.expert_choice_select`, `rules.gated_update`
        in the scattered form of `TokenSet.gated_scatter_add`)."""
        config, hidden = self.config, state.hidden
        candidates = state.candidates
        if candidates is None:
            candidates = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        router = self.routers[str(r)]
        logits, aux_logits = router(hidden)
        decision = expert_choice_select(
            logits, aux_logits, candidates, config.capacity_tokens(hidden.shape[0])[r],
            config.capacities[r], mode,
        )
        tokens = (
            TokenSet.dense(decision.index)
            if decision.index is not None
            else self._varlen_tokens(decision.selected)
        )
        block_out = self._run_block_on(tokens, hidden, rotary, kv_store, r)
        out.run_tokens.append(self._rows_run(tokens, hidden))
        gate = tokens.gather_values(router.gate(logits))
        hidden = tokens.gated_scatter_add(hidden, gate, block_out, config.scatter_kernel)

        step_losses = expert_choice_losses(
            config, logits, aux_logits, candidates, decision.selected, self._dp_group()
        )
        for name, value in step_losses.items():
            losses[name] = losses.get(name, 0.0) + value
        for name, value in expert_choice_step_stats(logits, candidates, decision.selected).items():
            getattr(out, name).append(value)
        if record:
            out.selections.append(decision.selected)
        return RoutingState(hidden, candidates=decision.selected)

    def _token_choice_step(
        self, r: int, state: RoutingState, rotary, kv_store: dict, out: RouterOutput, losses: dict,
        record: bool,
    ) -> RoutingState:
        """Recursion step r, token-choice: the router decides every depth at step 0; tokens run
        ungated while their depth lasts, and leave at the last step as H_1 + g * F_depth(H_1)."""
        if r == 0:
            depth, gate, logits = self.router(state.hidden)
            step_losses, counts, max_vio = token_choice_losses(
                self.config, logits, depth, self._dp_group()
            )
            losses.update(step_losses)
            out.depth_histogram, out.max_vio = counts, max_vio
            state = RoutingState(state.hidden, h1=state.hidden, depth=depth, gate=gate)
        active = token_choice_runs(state.depth, r)
        if self.config.token_choice_capacity_factor is not None and r > 0:
            active, state.depth = self._apply_capacity(r, active, state, out)
        tokens = self._varlen_tokens(active)
        running = tokens.scatter(state.hidden, self._run_block_on(tokens, state.hidden, rotary, kv_store, r))
        out.selected_tokens.append(active.sum())
        out.run_tokens.append(self._rows_run(tokens, state.hidden))
        if record:
            out.selections.append(active)
        if r == self.config.num_recursions - 1:
            return RoutingState(token_choice_combine(state.h1, state.gate, running))
        return RoutingState(running, h1=state.h1, depth=state.depth, gate=state.gate)

    def _apply_capacity(
        self, r: int, active: Tensor, state: RoutingState, out: RouterOutput
    ) -> tuple[Tensor, Tensor]:
        """Token-choice capacity at step r (`rules.token_choice_drop`), with its drop rate."""
        limit = token_choice_capacity_limit(
            self.config.token_choice_capacity_factor, self.config.capacities[r], active.numel()
        )
        assigned = int(active.sum())
        out.drop_rate.append(torch.tensor(max(0, assigned - limit) / max(1, assigned), device=active.device))
        if assigned <= limit:
            return active, state.depth
        return token_choice_drop(active, state.gate, state.depth, r, limit)

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: Optional[Tensor],
        attention_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        routing_mode: str = "topk",
        record_selections: bool = False,
        **unused,
    ) -> Tensor:
        """`[S, B, D]` in and out, as megatron's block; the router output lands in `router_output`.

        routing_mode: "topk" (training, per-sequence capacity) or "threshold" (causal per-token
        decisions, as at decode time). record_selections: keep each step's `[S, B]` mask in
        `router_output.selections`. A stage that is not the last returns the packed routing
        state `[S, B, D + extra]` for the next stage.
        """
        if unused.get("inference_context") is not None:
            raise NotImplementedError("MoR decoding uses mor_megatron.inference, not megatron's")
        if routing_mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode '{routing_mode}': use one of {', '.join(ROUTING_MODES)}")
        if self.pre_process:
            state = RoutingState(hidden_states)
        else:
            state = unpack_state(self.input_tensor, self.config)
        steps = [unit.index for unit in self.units if unit.kind == "recursion"]
        out = RouterOutput(aux_loss=state.hidden.new_zeros(()), first_step=min(steps, default=0))
        losses: dict[str, Tensor] = {}
        kv_store: dict = {}
        with fp8_context(self.config, "decoder"):  # delayed scaling: one region, all recursions
            for unit in self.units:
                if unit.kind == "layer":
                    state.hidden = self._run_layers((unit.index,), state.hidden, rotary_pos_emb)
                elif self.config.router == "expert_choice":
                    state = self._expert_choice_step(
                        unit.index, state, rotary_pos_emb, routing_mode, kv_store, out, losses, record_selections
                    )
                else:
                    state = self._token_choice_step(
                        unit.index, state, rotary_pos_emb, kv_store, out, losses, record_selections
                    )
        self.router_output = None
        if steps:
            out.losses = {name: value.detach() for name, value in losses.items()}
            out.aux_loss = weighted_aux_loss(self.config, losses) if losses else out.aux_loss
            self.router_output = out

        if self.post_process:
            output = state.hidden
            if self.final_layernorm is not None:
                output = self.final_layernorm(output)
        else:
            output = pack_state(state, self.config)
        if self.router_output is not None and torch.is_grad_enabled() and output.requires_grad:
            # the router loss rides on the activations, so it reaches its gradients on any stage
            output = MoEAuxLossAutoScaler.apply(output, self.router_output.aux_loss)
        return output
