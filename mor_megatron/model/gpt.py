"""`MoRGPTModel`: megatron's `GPTModel` (embedding, RoPE, tied LM head, loss) with the MoR decoder."""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from mor_megatron.config import MoRConfig
from mor_megatron.model.decoder import MoRDecoder
from mor_megatron.model.routing import RouterOutput
from mor_megatron.model.rules import Unit


class MoRGPTModel(GPTModel):
    """A Llama-shaped GPTModel whose decoder is `MoRDecoder`.

    megatron's GPTModel always builds a plain `TransformerBlock` from its spec, so the parent is
    given an empty block and the MoR decoder is installed in its place.
    """

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
        """`units`: the decoder units this pipeline stage runs (default: all of them)."""
        super().__init__(
            config=config,
            transformer_layer_spec=TransformerBlockSubmodules(layer_specs=[], layer_norm=None),
            vocab_size=config.vocab_size,
            max_sequence_length=config.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=config.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=config.rotary_base,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.backend = backend
        self.decoder = MoRDecoder(
            config,
            backend=backend,
            pre_process=pre_process,
            post_process=post_process,
            units=units,
            pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )

    @property
    def router_output(self) -> Optional[RouterOutput]:
        """Routing losses and statistics of the latest forward (None without a router)."""
        return self.decoder.router_output
