"""The MoR decoder: megatron's `TransformerBlock` with a recursion loop in place of its layer loop.

`self.layers` holds the unique layers (what owns weights). The recursion plan says which of them
run at each unrolled depth; a shared layer is one module called at every recursion, so its
parameters are one `Parameter` each and autograd sums their gradients over all uses.

With a router, each recursion step gathers its active tokens from the `[S, B, D]` residual stream,
runs the shared block on them only (so its matmuls and attention see k_r tokens, not S) and
scatters the result back:
  expert-choice: H <- H + g * f(H) at the selected tokens (f includes the block's residuals);
  token-choice:  tokens run ungated while their depth lasts, then H = H_1 + g * F_depth(H_1).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mor_megatron.config import MoRConfig
from mor_megatron.model.routing import (
    ExpertChoiceRouter,
    RouterOutput,
    TokenChoiceRouter,
    expert_choice_losses,
    expert_choice_select,
    expert_choice_step_stats,
    token_choice_losses,
    weighted_aux_loss,
)
from mor_megatron.model.specs import get_mor_block_spec
from mor_megatron.model.token_set import TokenSet

ROUTING_MODES = ("topk", "threshold")


class MoRDecoder(TransformerBlock):
    def __init__(
        self,
        config: MoRConfig,
        backend: str = "local",
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection=None,
        vp_stage: Optional[int] = None,
    ) -> None:
        super().__init__(
            config=config,
            spec=get_mor_block_spec(config.num_layers, backend),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.plan = config.recursion_plan
        if config.router == "expert_choice":
            self.routers = nn.ModuleList(
                ExpertChoiceRouter(config) for _ in range(config.num_recursions)
            )
        elif config.router == "token_choice":
            self.router = TokenChoiceRouter(config)
        self.routing_mode = "topk"
        self.router_output: Optional[RouterOutput] = None

    # -- layer calls -------------------------------------------------------------------------

    def _run_layers(
        self, layers: tuple[int, ...], hidden: Tensor, rotary: Optional[Tensor], mask=None
    ) -> Tensor:
        for index in layers:
            layer = self.layers[index]
            if self.config.recompute_granularity == "full" and self.training:
                hidden = checkpoint(self._call_layer, layer, hidden, rotary, mask, use_reentrant=False)
            else:
                hidden = self._call_layer(layer, hidden, rotary, mask)
        return hidden

    @staticmethod
    def _call_layer(layer, hidden: Tensor, rotary: Optional[Tensor], mask) -> Tensor:
        return layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)[0]

    def _run_block_on(
        self, tokens: TokenSet, hidden: Tensor, rotary: Optional[Tensor], kv_store: dict, step: int
    ) -> Tensor:
        """The shared block on `tokens` only, at their original positions."""
        kv_role = "none"
        if self.config.kv_mode == "share_first":
            kv_role = "write" if step == 0 else "read"
        context = tokens.attention_context(kv_store, kv_role)
        return self._run_layers(self.plan.block, tokens.gather(hidden), tokens.rotary(rotary), context)

    # -- recursion with routing ---------------------------------------------------------------

    def _expert_choice(
        self, hidden: Tensor, rotary: Optional[Tensor], mode: str
    ) -> tuple[Tensor, RouterOutput]:
        config, seq_len = self.config, hidden.shape[0]
        capacity_tokens = config.capacity_tokens(seq_len)
        candidates = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        kv_store: dict = {}
        total: dict[str, Tensor] = {}
        out = RouterOutput(aux_loss=hidden.new_zeros(()))
        for step, router in enumerate(self.routers):
            logits, aux_logits = router(hidden)
            decision = expert_choice_select(
                logits, aux_logits, candidates, capacity_tokens[step],
                config.capacities[step], mode,
            )
            tokens = (
                TokenSet.dense(decision.index)
                if decision.index is not None
                else TokenSet.packed(decision.selected)
            )
            block_out = self._run_block_on(tokens, hidden, rotary, kv_store, step)
            gate = tokens.gather_values(router.gate(logits)).unsqueeze(-1)
            hidden = tokens.scatter_add(hidden, gate * block_out)

            for name, value in expert_choice_losses(
                config, logits, aux_logits, candidates, decision.selected
            ).items():
                total[name] = total.get(name, 0.0) + value
            for name, value in expert_choice_step_stats(logits, candidates, decision.selected).items():
                getattr(out, name).append(value)
            out.selections.append(decision.selected)
            candidates = decision.selected
        out.losses = {name: value.detach() for name, value in total.items()}
        out.aux_loss = weighted_aux_loss(config, total)
        return hidden, out

    def _token_choice(self, hidden: Tensor, rotary: Optional[Tensor]) -> tuple[Tensor, RouterOutput]:
        depth, gate, logits = self.router(hidden)
        losses, counts, max_vio = token_choice_losses(self.config, logits, depth)
        out = RouterOutput(
            aux_loss=weighted_aux_loss(self.config, losses),
            losses={name: value.detach() for name, value in losses.items()},
            depth_histogram=counts,
            max_vio=max_vio,
        )
        kv_store: dict = {}
        state = hidden  # F_r(H_1) for tokens still running
        for step in range(self.config.num_recursions):
            active = depth >= step
            tokens = TokenSet.packed(active)
            state = tokens.scatter(state, self._run_block_on(tokens, state, rotary, kv_store, step))
            out.selected_tokens.append(active.sum())
            out.selections.append(active)
        return hidden + gate.unsqueeze(-1) * state, out

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: Optional[Tensor],
        attention_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        routing_mode: Optional[str] = None,
        **unused,
    ) -> Tensor:
        """`[S, B, D]` in and out, as megatron's block; the router output lands in `router_output`.

        routing_mode: "topk" (training, per-sequence capacity) or "threshold" (causal per-token
        decisions, as at decode time); defaults to `self.routing_mode`.
        """
        if unused.get("inference_context") is not None:
            raise NotImplementedError("MoR decoding uses mor_megatron.inference, not megatron's")
        mode = routing_mode or self.routing_mode
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode '{mode}': use topk or threshold")
        hidden = hidden_states if self.pre_process else self.input_tensor
        hidden = self._run_layers(self.plan.prefix, hidden, rotary_pos_emb)
        if self.config.router == "none":
            rest = self.plan.unrolled[len(self.plan.prefix) :]
            hidden = self._run_layers(rest, hidden, rotary_pos_emb)
            self.router_output = None
        else:
            if self.config.router == "expert_choice":
                hidden, self.router_output = self._expert_choice(hidden, rotary_pos_emb, mode)
            else:
                hidden, self.router_output = self._token_choice(hidden, rotary_pos_emb)
            hidden = self._run_layers(self.plan.suffix, hidden, rotary_pos_emb)
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        if self.router_output is not None and torch.is_grad_enabled() and hidden.requires_grad:
            # the router loss rides on the activations, so it reaches its gradients on any stage
            hidden = MoEAuxLossAutoScaler.apply(hidden, self.router_output.aux_loss)
        return hidden
