"""Typed run configuration: one YAML file, five sections, validated before anything starts.

    model:    MoRConfig fields (mor_megatron.config)
    parallel: tensor / pipeline sizes (data parallel is what the world size leaves)
    data:     token shards (blend) and the tokenizer they were made with
    training: batch, schedule, optimizer, precision, checkpoints
    logging:  run directory, TensorBoard, metrics, MFU peak
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from mor_megatron.config import ConfigError, MoRConfig
from mor_megatron.ranges import check_ranges
from mor_megatron.yaml_config import RUN_ONLY_FIELDS, load_sections, model_config_from_dict, section_from_dict


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_ranges("parallel", self)


@dataclass
class DataConfig:
    train: str = ""  # "PREFIX" or a weighted blend "0.7 PREFIX_A 0.3 PREFIX_B"
    valid: Optional[str] = None  # held-out shard prefix; none: no validation
    tokenizer: Optional[str] = None  # folder or hub name; checked against model.vocab_size


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_steps: int = 100
    seed: int = 1234
    # AdamW and schedule (docs/DESIGN.md 8)
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    lr_schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # WSD cool-down share of the steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    zero_stage: Optional[int] = None  # None: auto, see `zero_stage_for`
    bf16: Optional[bool] = None  # None: bf16 where a GPU supports it, fp32 on CPU
    recompute: bool = False  # full activation recomputation per layer
    compile: Optional[bool] = None  # torch.compile each layer; None: on where the device is CUDA
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: tracing only, for tests)
    backend: str = "local"  # local | te
    # evaluation, checkpoints, faults
    eval_interval: int = 0  # steps between validation passes; 0: only at the end
    eval_batches: int = 8
    # lm-eval tasks scored at each evaluation (docs/DESIGN.md 8.2): task names,
    # task YAML files or folders of them; empty: none. Needs data.tokenizer and lm-eval installed.
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_limit: Optional[int] = 100  # examples per task (None: all), so training is not stalled
    eval_tasks_num_fewshot: Optional[int] = None  # None: each task's own default
    eval_tasks_batch_size: int = 8  # sequences per scoring pass (micro-batches of micro_batch_size)
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    save_dir: Optional[str] = None  # default: <logging.dir>/checkpoints
    keep_checkpoints: int = 3
    resume: bool = True  # continue from the newest complete checkpoint in save_dir
    init_from: Optional[str] = None  # layout-free weights to start from (dist-checkpoint dir)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    exit_after_steps: Optional[int] = None  # leave (with a checkpoint) after this many steps of this launch

    def __post_init__(self) -> None:
        check_ranges("training", self)
        _check(
            self.lr_schedule in ("wsd", "cosine", "constant"),
            f"unknown training.lr_schedule '{self.lr_schedule}': choose one of wsd, cosine, constant",
        )
        _check(self.backend in ("local", "te"), f"unknown training.backend '{self.backend}': use local or te")
        _check(
            self.compile_backend in COMPILE_BACKENDS,
            f"unknown training.compile_backend '{self.compile_backend}': use one of {', '.join(COMPILE_BACKENDS)}",
        )


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: Optional[float] = None  # per device, for MFU; None: auto (CPU probe / GPU table)

    def __post_init__(self) -> None:
        check_ranges("logging", self)


@dataclass
class RunConfig:
    model: MoRConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.training.save_dir or str(Path(self.logging.dir) / "checkpoints")


def validate(run: RunConfig) -> None:
    """Cross-section checks that need no process group (each section checks its own settings
    when it is built: `MoRConfig`, `ParallelConfig`, `TrainingConfig`)."""
    t, p = run.training, run.parallel
    _check(bool(run.data.train), "data.train is empty: point it at a token shard prefix (see tools/preprocess_data.py)")
    _check(
        not t.eval_tasks or bool(run.data.tokenizer),
        "training.eval_tasks needs data.tokenizer (lm-eval tasks are text): set it to the tokenizer "
        "the shards were made with",
    )
    if p.pipeline_model_parallel_size > 1:
        _check(
            t.zero_stage in (None, 1),
            f"training.zero_stage={t.zero_stage} with pipeline parallelism: use zero_stage 1",
        )
        from mor_megatron.parallel.pipeline import plan_stages

        try:
            plan_stages(run.model, p.pipeline_model_parallel_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def zero_stage_for(zero_stage: Optional[int], data_parallel: int, pipeline_parallel: int, bf16: bool) -> int:
    """The ZeRO stage a run uses: `training.zero_stage` where set; unset (auto), 1, except at one
    data-parallel rank in fp32 without pipeline parallelism, where ZeRO-1 would partition nothing
    and still copy every gradient into its one partition each step: there 0, which gives the same
    updates (tests/test_distributed.py::test_zero_stages_match) faster (README: Benchmarks, the
    trainer at one data-parallel rank). bf16 stays at 1: DeepSpeed runs its BF16_Optimizer there
    (fp32 master weights and gradient accumulation), not a partitioning one."""
    if zero_stage is not None:
        return zero_stage
    return 0 if data_parallel == 1 and pipeline_parallel == 1 and not bf16 else 1


def check_layout(run: RunConfig, world_size: int) -> int:
    """The data-parallel size of a launch of `world_size` processes, or one line saying why the
    global batch does not split over it. That the world divides into TP x PP is checked once, by
    `parallel.state.initialize_parallel`, before this runs."""
    dp = world_size // (run.parallel.tensor_model_parallel_size * run.parallel.pipeline_model_parallel_size)
    t = run.training
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
            f"{t.micro_batch_size} x data-parallel size {dp}: use a multiple of "
            f"{t.micro_batch_size * dp}"
        )
    return dp


def check_data(run: RunConfig) -> None:
    """Check the run's tokenizer and open its shards as the trainer will (data-parallel size 1),
    before anything starts: model.vocab_size covers the tokenizer, and every prefix exists, is
    whole, holds a row and fits model.vocab_size. Cheap: index headers and file sizes. Raises
    `DataError`."""
    from mor_megatron.data.dataset import ValidationBatches, parse_blend
    from mor_megatron.data.blending import normalize_weights
    from mor_megatron.data.shards import TokenStream, check_shard_vocab
    from mor_megatron.data.tokenizer import check_vocab, load_tokenizer

    if run.data.tokenizer:
        check_vocab(load_tokenizer(run.data.tokenizer).vocab_size, run.model.vocab_size)
    seq_length = run.model.seq_length
    blend = parse_blend(run.data.train)
    normalize_weights([weight for weight, _ in blend])
    for _, prefix in blend:
        TokenStream(prefix, seq_length)
        check_shard_vocab(prefix, run.model.vocab_size)
    if run.data.valid:
        ValidationBatches(run.data.valid, seq_length, run.training.micro_batch_size,
                          max_microbatches=run.training.eval_batches)
        check_shard_vocab(run.data.valid, run.model.vocab_size)


def run_model_settings(parallel: ParallelConfig, training: TrainingConfig) -> dict:
    """The model settings a run takes from its parallel and training sections (layout, bf16,
    recompute): built into the model config with the `model:` section, once."""
    from mor_megatron.training.optimizer import use_bf16  # imports DeepSpeed: only when a run is built

    recompute = training.recompute
    return {
        "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "bf16": use_bf16(training),
        "recompute_granularity": "full" if recompute else None,
        "recompute_method": "uniform" if recompute else None,
        "recompute_num_layers": 1 if recompute else None,
    }


def _check_model_section(section: dict, source: str) -> None:
    """A run's model section may not set what its other sections set (it would be overruled)."""
    for key in section:
        where = RUN_ONLY_FIELDS.get(str(key), "")
        if where.startswith(("parallel.", "training.")):
            raise ConfigError(f"{source}: model.{key} is a run setting: set {where} instead")


def load_run_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a run config; every problem is one `ConfigError` line.

    The model config is built here, once, with the run's layout, bf16 and recompute, and is
    frozen: the trainer builds its model from `run.model` as it is."""
    sections = load_sections(path, overrides)
    if "model" not in sections:
        raise ConfigError(f"{path}: no 'model:' section; add one with at least effective_layers")
    _check_model_section(sections["model"], str(path))
    parallel = section_from_dict(ParallelConfig, sections.get("parallel", {}), "parallel", str(path))
    training = section_from_dict(TrainingConfig, sections.get("training", {}), "training", str(path))
    model = model_config_from_dict(
        dict(sections["model"], **run_model_settings(parallel, training)), str(path)
    )
    run = RunConfig(
        model=model,
        parallel=parallel,
        data=section_from_dict(DataConfig, sections.get("data", {}), "data", str(path)),
        training=training,
        logging=section_from_dict(LoggingConfig, sections.get("logging", {}), "logging", str(path)),
    )
    try:
        validate(run)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return run


def run_config_dict(run: RunConfig) -> dict:
    """The YAML-able form of a run (saved in checkpoints and the run directory)."""
    from mor_megatron.yaml_config import dump_model_config

    out = {"model": dump_model_config(run.model)}
    for name in ("parallel", "data", "training", "logging"):
        out[name] = dataclasses.asdict(getattr(run, name))
    return out
