"""The training loop: one readable function, Accelerate at its edges.

Data order is ours, not the dataloader's: each epoch is a seeded permutation cut into *global* batches
of batch_size × processes × grad_accum records, so the batches do not depend on the number of processes.
Each global batch is sorted by length and split into micro-batch slots; process k takes slots
k, k + P, k + 2P, …. The loss of a step is Σ token losses / loss tokens of the whole global batch, so
`--batch-size 8` equals `--batch-size 4 --grad-accum 2` and 2 processes equal 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import re
import resource
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.text import Text

from lora_cli.checkpoints import (
    CHECKPOINTS,
    StopFlag,
    check_run_dir,
    list_checkpoints,
    load_checkpoint_state,
    optimizer_state,
    prune_checkpoints,
    rng_state,
    run_lock,
    save_checkpoint,
)
from lora_cli.config import RESUMABLE_OVERRIDES, TrainConfig, read_yaml_config
from lora_cli.data import (
    CHAT_TEMPLATE_FILE,
    IGNORE,
    PARALLEL_MIN_RECORDS,
    Encoder,
    EncodeStats,
    Example,
    check_template,
    collate,
    fingerprint,
    load_eval_records,
    load_records,
    pack,
    split_eval,
)
from lora_cli.display import RecordProgress, TrainProgress, counted, kv_table, plot_loss
from lora_cli.errors import UserError, atomic_write_text, read_text, sweep_stale_temps
from lora_cli.lora import (
    AdapterConfig,
    inject_lora,
    lora_layers,
    lora_state_dict,
    param_report,
    peft_target_names,
    resolve_targets,
)
from lora_cli.lora.adapter import read_adapter_tensors
from lora_cli.lora.adapter import write_adapter as write_adapter_files
from lora_cli.lora.layer import is_conv1d
from lora_cli.lora.peft_format import (
    CONFIG_NAME,
    GGUF_BASE_KEY,
    KEY_PREFIX,
    WEIGHTS_NAME,
    read_adapter_config,
)
from lora_cli.loss import CausalLMLoss, head_is_last
from lora_cli.merging import shared_weight_groups
from lora_cli.models import (
    check_token_ids,
    context_length,
    hub_revision,
    load_model,
    load_tokenizer,
    local_path,
    peft_misread_targets,
    peft_refused_targets,
    quantization_4bit,
    resolve_model,
    torch_dtype,
)

CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"
LOSS_PLOT = "loss.png"
DEFAULT_MAX_LENGTH = TrainConfig.max_length  # lowered to the model's context when that is shorter
# what a run writes: --force removes these, and only these
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, LOSS_PLOT, CHAT_TEMPLATE_FILE, CONFIG_NAME, WEIGHTS_NAME,
             CHECKPOINTS)


# ---------------------------------------------------------------- pure pieces

def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule. Warmup step
    s is at (s + 1) / (warmup + 1): no step is spent at lr 0 (transformers' s / warmup starts at 0)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_steps(warmup: float, total: int, rounded_up: bool = True) -> int:
    """< 1: a fraction of the steps, rounded up as transformers does (a fraction's float error aside: 0.1 of 30
    steps is 3), or to the nearest (half to even) for runs started before 2026-12-01; >= 1: a step count."""
    if warmup >= 1:
        return int(warmup)
    return math.ceil(round(warmup * total, 9)) if rounded_up else int(round(warmup * total))


GROUP_SPAN = 16  # global batches per length-sorted group


def epoch_batches(lengths: list[int], size: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation cut into `size` pieces.

    With `group`, each span of GROUP_SPAN batches is sorted by length before cutting, and the batch order
    is shuffled again: batches hold records of similar length (little padding) yet stay random. A short
    batch (n not a multiple of `size`) comes last and holds records drawn at random, not the shortest ones
    (sorted, they would be the same few every epoch, each time a whole step to themselves).
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not group:
        return [order[k : k + size] for k in range(0, n, size)]
    short, order = order[: n % size], order[n % size :]
    span = size * GROUP_SPAN
    order = [i for s in range(0, len(order), span) for i in sorted(order[s : s + span], key=lambda i: (-lengths[i], i))]
    full = [order[k : k + size] for k in range(0, len(order), size)]
    perm = torch.randperm(len(full), generator=g).tolist()
    return [full[p] for p in perm] + ([short] if short else [])


def micro_slots(indices: list[int], lengths: list[int], n_slots: int) -> list[list[int]]:
    """Split a global batch into `n_slots` micro-batches of similar length (sorted, then cut evenly)."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    n = len(ordered)
    return [ordered[s * n // n_slots : (s + 1) * n // n_slots] for s in range(n_slots)]


@dataclass
class Plan:
    n_train: int
    global_size: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    save_every: int


def make_plan(cfg: TrainConfig, n_train: int, world: int) -> Plan:
    if cfg.grad_accum > 1 and world * cfg.grad_accum > n_train:  # micro-batches past the data would run as padding
        processes = f" × {world} processes" if world > 1 else ""
        raise UserError(f"--grad-accum {cfg.grad_accum}{processes} makes {world * cfg.grad_accum} micro-batches per "
                        f"step, but the training data is {n_train} sequences; use --grad-accum "
                        f"{max(1, n_train // world)} or less (and a larger --batch-size)")
    size = cfg.batch_size * world * cfg.grad_accum
    per_epoch = math.ceil(n_train / size)
    total = cfg.max_steps or cfg.epochs * per_epoch
    return Plan(n_train, size, per_epoch, total, warmup_steps(cfg.warmup, total),
                cfg.save_every or max(1, total // 10))


# ---------------------------------------------------------------- setup

def resolve_run_config(cfg: TrainConfig, resume: bool, given: dict) -> TrainConfig:
    """With --resume the run's saved config rules; only RESUMABLE_OVERRIDES may differ. `given` holds what the
    user set, by flag or --config YAML."""
    if not resume:
        return cfg
    if not cfg.output:
        raise UserError("--resume needs --output RUN_DIR (the run to continue)")
    saved_path = Path(cfg.output) / CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(f"--resume: {cfg.output} has no {CONFIG_FILE}; is it a lora run directory?")
    what = f"--resume: the run's {saved_path}"
    saved = TrainConfig.from_dict(read_yaml_config(str(saved_path), what), source=what)
    asked, kept = cfg.resolved(), saved.resolved()  # paths compared absolute, aliases spelled out
    changed = [k for k in given if k not in RESUMABLE_OVERRIDES + ("output",) and getattr(asked, k) != getattr(kept, k)
               and not (k == "max_length" and _lowered_default(asked.max_length, kept.max_length))]
    if changed:
        raise _cannot_change(changed)
    for k in RESUMABLE_OVERRIDES:
        if given.get(k) is not None:
            setattr(saved, k, given[k])
    if given.get("epochs") is not None and given.get("max_steps") is None:
        saved.max_steps = None  # a run started with --max-steps now counts in the epochs asked for
    saved.output = cfg.output  # the directory being resumed, even if it was moved or copied
    return saved


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's own check: AVX512-BF16 or AMX); True if unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def _lowered_default(asked: int, kept: int) -> bool:
    """The default max length (as a --dry-run YAML writes it down) against a run that saved a shorter one: the same
    value if the run lowered it to the model's context, which `train` checks once the model is known."""
    return asked == DEFAULT_MAX_LENGTH > kept


def _cannot_change(keys: list[str]) -> UserError:
    """What a resume says of options that must stay as the run was started."""
    return UserError(f"--resume cannot change {', '.join('--' + k.replace('_', '-') for k in keys)} "
                     f"(only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_OVERRIDES)} may change)")


def encode_datasets(cfg: TrainConfig, tokenizer, console=None, processes: int = 1
                    ) -> tuple[list[Example], list[Example] | None, EncodeStats, EncodeStats | None]:
    """Load and tokenize the training (and eval) records; `console` shows a bar for large datasets. `processes`
    of the run on this machine tokenize at once: they share its cores."""
    train_records, valid_records = load_records(cfg.data, cfg.data_split, None if cfg.eval_data else cfg.eval_data_split,
                                                cfg.data_config)
    if cfg.eval_data:
        valid_records = load_eval_records(cfg.eval_data, cfg.eval_data_split, cfg.eval_data_config)
    elif valid_records is None and cfg.eval_split > 0:
        train_records, valid_records = split_eval(train_records, cfg.eval_split, cfg.seed)
    elif cfg.eval_split > 0 and console is not None:
        console.print(f"note: --eval-split {cfg.eval_split} is not used: {cfg.data} has its own validation split "
                      f"({len(valid_records)} records), which is the eval data")
    template = read_text(cfg.chat_template, f"--chat-template {cfg.chat_template!r}") if cfg.chat_template else None
    if template is not None and not template.strip():
        raise UserError(f"--chat-template {cfg.chat_template!r} is empty")
    if template is not None:
        check_template(template, f"--chat-template {cfg.chat_template!r}")
    enc = Encoder(tokenizer, cfg.max_length, template, cfg.train_on_prompt)
    enc.one_format(train_records, valid_records)
    cores = tokenize_workers(cfg.num_proc, 0, processes)
    if cfg.num_proc and cores < cfg.num_proc and console is not None:
        console.print(f"note: --num-proc {cfg.num_proc} → {cores}, the CPU cores "
                      + (f"each of the run's {processes} processes here has" if processes > 1 else "this run has"))
    with RecordProgress(console, "tokenizing", len(train_records)) as advance:
        train, train_stats = enc.encode_all(train_records, "training data", advance,
                                            tokenize_workers(cfg.num_proc, len(train_records), processes))
    if template is not None and train_stats.shape == "text" and console is not None:
        console.print(f"note: --chat-template {cfg.chat_template} is not used: text records are learned as written "
                      "(no turns to render), and the run keeps no template")
    if cfg.packing:
        train = pack(train, cfg.max_length)
        train_stats.packed = len(train)
    if valid_records is None:
        if cfg.eval_every and console is not None:
            console.print(f"note: --eval-every {cfg.eval_every} is not used: there is no eval data (--eval-split, "
                          "--eval-data)")
        return train, None, train_stats, None
    with RecordProgress(console, "tokenizing eval", len(valid_records)) as advance:
        valid, valid_stats = enc.encode_all(valid_records, "eval data", advance,  # eval unpacked: per-record loss
                                            tokenize_workers(cfg.num_proc, len(valid_records), processes))
    return train, valid, train_stats, valid_stats


def tokenize_workers(asked: int | None, records: int, processes: int = 1) -> int:
    """--num-proc, up to the CPU cores this run's `processes` (on this machine) leave each; else that many, up
    to 8, for 1,024 records or more (below, starting them costs more than they save)."""
    cores = max(1, len(os.sched_getaffinity(0)) // max(1, processes)) if sys.platform == "linux" else 1
    if asked is not None:
        return min(asked, cores)
    return 1 if records < PARALLEL_MIN_RECORDS else min(8, cores)


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed memory back to the OS between training steps.

    By default glibc trims the heap top and unmaps large blocks as soon as they are freed, so every
    step page-faults the same few hundred MB of activations back in: on SmolLM2-135M (CPU, 8 × 256)
    that was 200k page faults and +20% time per step. Keeping freed memory (trim threshold 1 GB,
    mmap threshold at glibc's 32 MB maximum) leaves the peak RSS as it was. Linux/glibc only; returns
    whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- the loop

# metrics since the last row: Σ loss × loss tokens, loss tokens, tokens, seconds, steps
EMPTY_WINDOW = (0.0, 0, 0, 0.0, 0)


def train(cfg: TrainConfig, console, given: dict, resume: bool = False, force: bool = False) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` and write the run directory. Returns the summary."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import gather_object, set_seed

    t_begin = time.perf_counter()
    cfg = resolve_run_config(cfg, resume, given).resolved()
    cfg.validate()
    run_dir = Path(cfg.output)
    check_run_dir(run_dir, force, resume, RUN_FILES)
    if resume and not list_checkpoints(run_dir):
        raise UserError(f"--resume: {run_dir} has no complete checkpoint to continue from (the run stopped before its "
                        "first); start it again with --force")
    try:
        source = resolve_model(cfg.model, cfg.allow_pickle, cfg.revision)
    except UserError as e:
        if not resume:
            raise
        raise UserError(f"{e} (the model the run started with, as its {run_dir / CONFIG_FILE} names it; if it moved, "
                        "set model: there to its new place)", e.exit_code) from None
    keep_freed_memory()

    use_cuda = torch.cuda.is_available()
    dtype = torch_dtype(cfg.dtype, "cuda" if use_cuda else "cpu")
    slow_bf16 = not use_cuda and not cpu_has_bf16()
    if dtype != torch.float32 and not use_cuda and cfg.dtype == "float16":
        raise UserError("--dtype float16 needs a GPU; on CPU use float32" + (
            " (this CPU has no bfloat16 instructions: bfloat16 would run many times slower)" if slow_bf16
            else " or bfloat16"))
    if cfg.load_in_4bit:
        quantization_4bit(dtype)  # fail now, before anything loads, if 4-bit cannot work here
    mixed = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    # Accelerate keeps its settings process-wide: a second run in the same process (a notebook, the tests)
    # would inherit the first one's mixed precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=cfg.grad_accum, cpu=not use_cuda)
    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    engine = parallelism(acc)
    for variable, asked in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() in ("1", "true") and engine != asked:  # Accelerate's choice, on CPUs
            raise UserError(f"the launch asks for {asked} (accelerate launch --config_file …), which Accelerate runs "
                            f"on GPUs only: this run would be {engine if world > 1 else 'one process'}, each process "
                            "holding the whole base; launch it without that config (torchrun, or "
                            "configs/accelerate/multi-gpu.yaml), or on GPUs", shared=True)
    say = console.print if main else (lambda *a, **k: None)
    if dtype == torch.bfloat16 and slow_bf16:
        say("warning: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 is emulated and runs many "
            "times slower than float32 (19× measured on SmolLM2-135M); --dtype float32 is the fast choice here")

    with run_lock(run_dir) if main else contextlib.nullcontext():
        with acc.main_process_first():  # one process converts a GGUF / fills the caches, the others reuse them
            tokenizer = load_tokenizer(source, cfg.trust_remote_code, status=say)
            # the default, also as written back by --dry-run (a YAML value counts as given), is capped with a note
            explicit = "max_length" in given and cfg.max_length != DEFAULT_MAX_LENGTH
            cfg.max_length = fit_max_length(cfg, source, explicit, say)
            if resume and _lowered_default(given.get("max_length"), cfg.max_length) and cfg.max_length != \
                    fit_max_length(replace(cfg, max_length=DEFAULT_MAX_LENGTH), source, False, lambda _: None):
                raise _cannot_change(["max_length"])  # the run's shorter length was asked for, not the context's
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # processes on this machine, tokenizing at once
            train_ex, eval_ex, tstats, estats = encode_datasets(cfg, tokenizer, console if main else None, local)
            extra = {"quantization_config": quantization_4bit(dtype), "device_map": {"": acc.device}} \
                if cfg.load_in_4bit else {}
            load = functools.partial(load_model, source, dtype, cfg.trust_remote_code, cfg.allow_pickle,
                                     status=say, **extra)
            model = None if engine == "DeepSpeed" else load()
        if model is None:  # under ZeRO-3 loading partitions the weights: a collective of all processes
            model = load()
        check_token_ids(model, tokenizer, max(int(e.input_ids.max()) for e in train_ex + (eval_ex or [])))
        # the fused head + loss only where it computes the model's own logits (checked before LoRA or compiling;
        # ZeRO-3 has partitioned the weights: a forward outside its engine cannot run, and the rules decide)
        try:  # (the model's first forward, before LoRA)
            fast_head = engine == "DeepSpeed" or head_is_last(
                model, torch.as_tensor(train_ex[0].input_ids[:4], device=next(model.parameters()).device).long()[None])
        except Exception as e:
            if "out of memory" in str(e).lower():
                raise
            from transformers import __version__ as version

            raise UserError(f"{type(model).__name__} fails in its own forward pass over 4 tokens, before any LoRA "
                            f"({type(e).__name__}: {e}); the model or its config.json does not run in transformers "
                            f"{version} as it is") from None
        set_seed(cfg.seed)
        paths, adapter_cfg = add_lora(model, cfg, source)
        misread = peft_misread_targets(model, adapter_cfg.target_modules)
        if misread:
            say(f"warning: PEFT will not load this adapter as trained: on {model.config.model_type} models it reads "
                f"{', '.join(misread)} as the fused MoE experts. lora generate and lora merge load it exactly; "
                "train attention projections only (--targets attention) to share it through PEFT.")
        wrapped = set(paths)
        shared = [g for g in ([p for p in (n.removesuffix(".base_layer") for n in group) if p in wrapped]
                              for group in shared_weight_groups(model)) if len(g) > 1]
        if shared:
            more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
            say(f"note: {shared[0][0]} and {shared[0][1]}{more} use one weight (a block reused by several layers); "
                "each use trains its own adapter, as in PEFT, so lora merge cannot bake them into one weight: use "
                "the adapter on the base")
        report = param_report(model)
        meta = {GGUF_BASE_KEY: source.path} if source.is_gguf else {}
        kept = list_checkpoints(run_dir) if resume else []
        if resume and not kept:  # (there at the start: another command replaced the folder meanwhile)
            raise UserError(f"--resume: {run_dir} no longer holds the run's checkpoints (replaced while this run "
                            "started?)")
        ckpt = kept[-1][1] if resume else None
        if ckpt:  # into the plain model, before any wrapper (DDP/FSDP) shards or copies it
            try:
                saved_tensors = read_adapter_tensors(ckpt)
            except UserError as e:
                raise UserError(f"{e}; delete the checkpoint {ckpt} to resume from an earlier one") from None
            if edited := settings_changed(read_adapter_config(ckpt), adapter_cfg):
                raise UserError(f"{run_dir / CONFIG_FILE} no longer says how the run was started (edited?): "
                                f"{', '.join(edited)} since {ckpt.name}; restore it")
            load_lora_weights(model, saved_tensors, ckpt, run_dir / CONFIG_FILE)

        plan = make_plan(cfg, len(train_ex), world)
        params = [p for p in model.parameters() if p.requires_grad]
        # the fused kernel: one pass over all tensors (2.5 vs 14 ms a step for SmolLM2's 240 LoRA tensors on a CPU)
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, plan.total_steps, plan.warmup, cfg.scheduler))
        loss_model = CausalLMLoss(model, fused=fast_head)
        if engine == "DeepSpeed":  # our flags rule (no DataLoader to infer the batch from); DeepSpeed clips
            acc.state.deepspeed_plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                gradient_clipping=cfg.max_grad_norm)
        loss_model, optimizer = acc.prepare(loss_model, optimizer)
        params = [p for p in loss_model.parameters() if p.requires_grad]  # FSDP2 replaced them with DTensors
        device = acc.device
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if cfg.packing:  # before anything is written to the run directory
            check_packing(loss_model, model, train_ex[0], pad_id, device, dtype)

        state = {"step": 0, "loss_tokens_seen": 0, "wall_time_s": 0.0, "eval_history": [], "best_eval_loss": None,
                 "best_eval_step": None, "last_loss": None, "data_fingerprint": fingerprint(train_ex),
                 "window": EMPTY_WINDOW, "warmup_rounded_up": True}
        if ckpt:
            saved = load_checkpoint_state(ckpt, loss_model, optimizer, scheduler, rank, world, engine)
            if saved.get("data_fingerprint", state["data_fingerprint"]) != state["data_fingerprint"]:
                raise UserError(f"the training data is not the run's any more ({cfg.data} gives other tokens than "
                                f"when {ckpt.name} was written); --resume continues the same run exactly: restore "
                                "the data, or start a new run")
            state.update(saved, warmup_rounded_up=saved.get("warmup_rounded_up", False))
            if not state["warmup_rounded_up"]:  # a run started before the warmup was rounded up keeps its schedule
                plan = replace(plan, warmup=warmup_steps(cfg.warmup, plan.total_steps, rounded_up=False))
            if state["step"] >= plan.total_steps and (run_dir / SUMMARY_FILE).is_file():
                raise UserError(f"the run already reached step {state['step']} of {plan.total_steps}; raise "
                                "--max-steps or --epochs to train further")
            if state["step"] > plan.total_steps:  # (an interrupted run: it would be called done, its length lost)
                raise UserError(f"the run's last checkpoint is at step {state['step']}, past the {plan.total_steps} "
                                f"steps asked; give --max-steps {state['step']} or more (or --epochs)")
            # the main process's alone: it appends to the file next, and another's rewrite landing after that
            # replaced the file it appends to (rows lost, silently)
            if main and (bad := _truncate_metrics(run_dir / METRICS_FILE, state["step"])):
                say(f"warning: {run_dir / METRICS_FILE}: dropped {len(bad)} line(s) that are not metric rows "
                    f"(line {', '.join(map(str, bad[:5]))}{' …' if len(bad) > 5 else ''}); the file was damaged or edited")
            # the schedule is the resumed run's (--max-steps or --epochs may have grown): the optimizer's saved
            # lr is the old schedule's next one (0 after a finished cosine), so set the new one's
            factor = lr_factor(state["step"], plan.total_steps, plan.warmup, cfg.scheduler)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * factor
            say(Text.assemble(("resuming", "bold"), f" {run_dir} from step {state['step']}"))

        if main:
            if not resume:
                clear_run_files(run_dir)
            else:  # continued: until it ends, the run's final adapter and summary are not its state
                set_aside_final_files(run_dir)
            for d in (run_dir, run_dir / CHECKPOINTS):  # what a killed run was writing (the lock is ours)
                sweep_stale_temps(d)
            atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())
            if tstats.template:  # generate, merge and export prompt the way the run trained
                atomic_write_text(run_dir / CHAT_TEMPLATE_FILE, tstats.template)
            say(_before_table(cfg, source, model, report, paths, tstats, estats, plan, engine, world, device, dtype))

        def write_adapter(d: Path, tensors: dict) -> None:
            write_adapter_files(d, adapter_cfg, tensors, meta)
            if tstats.template and d != run_dir:  # a checkpoint copied out of its run prompts as the run trained
                atomic_write_text(d / CHAT_TEMPLATE_FILE, tstats.template)

        lengths = [len(e.input_ids) for e in train_ex]
        n_loss = [e.n_loss for e in train_ex]
        n_slots = world * cfg.grad_accum
        setup_s = time.perf_counter() - t_begin  # this start's: loading the model, tokenizing
        t_start = time.perf_counter() - state["wall_time_s"]
        cached_epoch, batches = -1, []
        metrics_fh = open(run_dir / METRICS_FILE, "a", encoding="utf-8") if main else None
        if not cfg.compile:  # compiled layers run q/k/v separately; a probe would only compile another graph
            idle = probe_forward(loss_model, train_ex[0], pad_id, device, lora_layers(model))
            if idle:
                say(f"warning: LoRA on {len(idle)} module(s) never runs (e.g. {idle[0]}): the model reads their "
                    "weights directly, or they serve another input (images, audio), so their adapters cannot learn "
                    "from this data; leave them out of --targets")
        loss_model.train()
        stopped = None

        def agreed(signal_name: str | None) -> str | None:
            """Whether to stop now: every process must agree to stop at the same step (collectives follow)."""
            if world == 1:
                return signal_name
            kinds = ("SIGINT", "SIGTERM")  # (which one: the message and the exit code name it)
            flags = acc.reduce(torch.tensor([float(signal_name == k) for k in kinds], device=device), "sum")
            return signal_name or next((k for k, f in zip(kinds, flags.tolist()) if f > 0), None)

        try:
            with StopFlag() as stop, TrainProgress(console, plan.total_steps, state["step"], main) as bar:
                for step in range(state["step"], plan.total_steps):
                    t0 = time.perf_counter()
                    epoch, k = divmod(step, plan.steps_per_epoch)
                    if epoch != cached_epoch:
                        batches = epoch_batches(lengths, plan.global_size, cfg.seed, epoch, cfg.group_by_length)
                        cached_epoch = epoch
                    batch = batches[k]
                    slots = micro_slots(batch, lengths, n_slots)
                    n_global = sum(n_loss[i] for i in batch)
                    loss_sum = torch.zeros((), device=device)
                    tokens = 0
                    for a in range(cfg.grad_accum):
                        mine = slots[a * world + rank]
                        with acc.accumulate(loss_model):
                            if mine:
                                b = _to(collate([train_ex[i] for i in mine], pad_id), device)
                                tokens += sum(lengths[i] for i in mine)
                            else:  # a short last batch left this slot empty: keep processes in lockstep
                                b = _to(collate([train_ex[batch[0]]], pad_id), device)
                            s, _ = loss_model(**b)
                            if not mine:
                                s = s * 0.0
                            # accelerate divides by grad_accum and DDP averages over processes: undo both, so
                            # the gradient is Σ token losses / loss tokens of the whole global batch.
                            acc.backward(s * (cfg.grad_accum * world / n_global))
                            loss_sum += s.detach()
                    loss = float(acc.reduce(loss_sum, "sum")) / n_global
                    if not math.isfinite(loss):
                        raise UserError(f"the loss became {loss} at step {step + 1}; lower --lr or check the data"
                                        + _last_good(run_dir), shared=True)
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    lr = optimizer.param_groups[0]["lr"]  # the one this step used
                    scheduler.step()
                    done = step + 1
                    tokens_all = int(acc.reduce(torch.tensor(tokens, device=device), "sum"))
                    dt = time.perf_counter() - t0
                    state.update(step=done, loss_tokens_seen=state["loss_tokens_seen"] + n_global, last_loss=loss,
                                 wall_time_s=time.perf_counter() - t_start)
                    # a metrics row sums the steps since the last one (--log-every): the loss is their mean per
                    # loss token; kept in the checkpoint state, so a resumed run logs the same rows
                    w = [a + b for a, b in zip(state["window"], (loss * n_global, n_global, tokens_all, dt, 1))]
                    state["window"] = w
                    row = {"step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": round(w[0] / w[1], 6),
                           "lr": lr, "tokens_per_s": round(w[2] / w[3], 1), "step_s": round(w[3] / w[4], 4),
                           "loss_tokens": w[1]}
                    is_last = done == plan.total_steps
                    new_best = False
                    if eval_ex and ((cfg.eval_every and done % cfg.eval_every == 0) or is_last):
                        ev = evaluate(loss_model, eval_ex, cfg.batch_size, pad_id, acc)
                        row.update(eval_loss=round(ev, 6), eval_ppl=round(math.exp(min(ev, 50)), 4))
                        state["eval_history"].append({"step": done, "eval_loss": ev})
                        if state["best_eval_loss"] is None or ev < state["best_eval_loss"]:
                            state.update(best_eval_loss=ev, best_eval_step=done)
                            new_best = True  # saved below, or the best could not be kept
                        loss_model.train()
                        state["wall_time_s"] = time.perf_counter() - t_start  # evaluation is part of the run's time
                    if done % cfg.log_every == 0 or is_last or "eval_loss" in row:
                        state["window"] = EMPTY_WINDOW
                        if main:
                            metrics_fh.write(json.dumps(row) + "\n")
                            metrics_fh.flush()
                    bar.update(done, loss, lr, tokens_all / dt,
                               f"eval {row['eval_loss']:.4f}" if "eval_loss" in row else "")
                    stopping = agreed(stop.signal)
                    if stopping or done % plan.save_every == 0 or is_last or new_best:
                        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
                        tensors = gathered_lora_tensors(acc, loss_model)  # a collective under FSDP / ZeRO-3
                        _require_finite(tensors, done, run_dir, acc)
                        opt_sd = optimizer_state(loss_model, optimizer, engine)  # also one
                        if main:
                            save_checkpoint(run_dir, done, lambda d, t=tensors: write_adapter(d, t), opt_sd,
                                            scheduler, state, rngs, engine)
                            prune_checkpoints(run_dir, cfg.save_total_limit, state["best_eval_step"])
                        if not stopping and not is_last:  # a signal that came during the save: this step's
                            stopping = agreed(stop.signal)  # checkpoint is the one to stop at, not the next's
                        if stopping:
                            stopped = stopping
                            break
        finally:
            if metrics_fh:
                metrics_fh.close()
        acc.wait_for_everyone()
        if not stopped and eval_ex and not any(h["step"] == state["step"] for h in state["eval_history"]):
            # resumed from the last step's checkpoint (stopped while it was saved): the end's evaluation is still due
            ev = evaluate(loss_model, eval_ex, cfg.batch_size, pad_id, acc)
            state["eval_history"].append({"step": state["step"], "eval_loss": ev})
            if state["best_eval_loss"] is None or ev < state["best_eval_loss"]:
                state.update(best_eval_loss=ev, best_eval_step=state["step"])
            if main:
                _add_to_row(run_dir / METRICS_FILE, state["step"], epoch=round(state["step"] / plan.steps_per_epoch, 4),
                            eval_loss=round(ev, 6), eval_ppl=round(math.exp(min(ev, 50)), 4))
        if stopped:
            number = getattr(signal.Signals, stopped, None)  # exit 128 + N, as a shell reports a signal's end
            how = f" (launched as this run was, on {world} processes)" if world > 1 else ""
            raise UserError(f"stopped by {stopped} after step {state['step']}; checkpoint saved. Resume with: "
                            f"lora train --output {shlex.quote(str(run_dir))} --resume{how}",
                            exit_code=128 + number if number else 1, shared=True)
        summary = _summary(cfg, state, plan, engine, world, tstats, estats, report, device) | {"setup_s": round(setup_s, 2)}
        tensors = gathered_lora_tensors(acc, loss_model)
        if main:
            write_adapter(run_dir, tensors)
            metrics = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
            drew = plot_loss(metrics, run_dir / LOSS_PLOT)
            atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")  # last: the run is done
            say(_after_table(summary, run_dir, drew))
            say(Text("next", style="bold cyan"))
            say(_next_commands(run_dir, cfg.model, cfg.allow_pickle, cfg.trust_remote_code, cfg.revision),
                soft_wrap=True, highlight=False)
        if world > 1:  # tear the process group down (gloo's threads outlive it: see cli.one_of_several_processes)
            acc.wait_for_everyone()
            acc.end_training()
    return summary


def fit_max_length(cfg: TrainConfig, source, explicit: bool, say) -> int:
    """--max-length, capped to the model's context: an explicit value beyond it is an error, the
    default is lowered with a note."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(local_path(source), trust_remote_code=cfg.trust_remote_code,
                                        **hub_revision(source))
    except Exception:
        return cfg.max_length  # the model load that follows reports the problem
    ctx = context_length(mc)
    if ctx is None or cfg.max_length <= ctx:
        return cfg.max_length
    if explicit:
        raise UserError(f"--max-length {cfg.max_length} exceeds the model's context of {ctx} tokens")
    say(f"note: max length {cfg.max_length} → {ctx}, the model's context")
    return ctx


def add_lora(model, cfg: TrainConfig, source) -> tuple[list[str], AdapterConfig]:
    """Wrap the targets with LoRA (A seeded by the caller), set up checkpointing, describe the adapter."""
    paths = resolve_targets(model, cfg.targets)
    refused = sorted({p.rsplit(".", 1)[-1] for p in peft_refused_targets(model, paths)})
    if refused:
        others = sorted({p.rsplit(".", 1)[-1] for p in paths} - set(refused) - {"dt_proj"})  # read directly too
        raise UserError(f"PEFT refuses LoRA on {', '.join(refused)} of {model.config.model_type} models (their fused "
                        "kernel reads the weight directly), so it could not load this adapter; "
                        + (f"use --targets {','.join(others)}" if others else "name other modules with --targets"))
    inject_lora(model, paths, cfg.rank, cfg.lora_alpha, cfg.dropout, cfg.rslora, cfg.dora)
    adapter_cfg = AdapterConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=peft_target_names(model, paths),
        lora_dropout=cfg.dropout, use_rslora=cfg.rslora, use_dora=cfg.dora,
        fan_in_fan_out=any(is_conv1d(model.get_submodule(p).base_layer) for p in paths),
        base_model_name_or_path=source.path if source.kind != "hub" else source.ref, revision=source.revision,
    )
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True):
            raise UserError(f"{type(model).__name__} does not support gradient checkpointing (transformers has none "
                            "for this architecture); train without --gradient-checkpointing")
        # non-reentrant + input grads, or a frozen base gives the adapters no gradient at all
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    if cfg.compile:
        compile_layers(model)
    return paths, adapter_cfg


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (regional compilation: the layers share one compiled
    graph, so compiling takes seconds, not minutes; parameter names are unchanged). Returns the count."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise UserError(f"--compile: no decoder layers found in {type(model).__name__} (its _no_split_modules "
                        "names none); train without --compile")
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)


def settings_changed(then: AdapterConfig, now: AdapterConfig) -> list[str]:
    """The LoRA settings a checkpoint was written with that the run's config now sets otherwise."""
    def listed(targets):
        return sorted(targets) if isinstance(targets, list) else targets

    pairs = (("rank", then.r, now.r), ("alpha", then.lora_alpha, now.lora_alpha),
             ("dropout", then.lora_dropout, now.lora_dropout), ("rslora", then.use_rslora, now.use_rslora),
             ("dora", then.use_dora, now.use_dora), ("targets", listed(then.target_modules), listed(now.target_modules)))
    return [f"{name} {a:g} → {b:g}" if isinstance(a, float) else f"{name} {a} → {b}" for name, a, b in pairs if a != b]


def load_lora_weights(model, tensors: dict, ckpt: Path, config: Path) -> None:
    """Copy a checkpoint's A/B into the model's (already injected) LoRA layers; a checkpoint of other settings
    than the run's `config` says (it was edited: another rank, other targets) is an error, not a size mismatch."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, p in params.items():
        if name not in tensors or tensors[name].shape != p.shape:
            held = f"{name} of shape {tuple(tensors[name].shape)}" if name in tensors else f"no {name}"
            raise UserError(f"checkpoint {ckpt} holds {held}, where the settings in {config} make "
                            f"{tuple(p.shape)}: the file no longer says how the run was started (edited?); restore "
                            "its rank, targets and model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def parallelism(acc) -> str:
    """How Accelerate spreads the work: "none", "DDP", "FSDP" or "DeepSpeed"."""
    from accelerate.utils import DistributedType

    names = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}
    return names.get(acc.distributed_type, "DDP" if acc.num_processes > 1 else "none")


def gathered_lora_tensors(acc, loss_model) -> dict[str, torch.Tensor]:
    """Full (unsharded) LoRA tensors in PEFT's key layout, fp32 CPU copies. Every process must call this:
    under FSDP and ZeRO-3 it gathers the shards (saving a local shard gives a mostly-zero or empty lora_B).
    Only the adapter is gathered, except under FSDP1, where Accelerate gathers the whole model to rank 0."""
    from accelerate.utils import DistributedType
    from torch.distributed.tensor import DTensor

    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        tensors = {k.removeprefix("model."): v for k, v in acc.get_state_dict(loss_model).items()
                   if ".lora_A." in k or ".lora_B." in k or k.endswith(".lora_magnitude_vector")}
        return {KEY_PREFIX + k: v.to("cpu", torch.float32, copy=True) for k, v in tensors.items()}
    # one process: nothing wraps it; DDP: its .module. (Accelerate's unwrap_model imports DeepSpeed, where installed,
    # to check for it, which on a CPU prints "Setting accelerator to CPU" on stdout: only FSDP and DeepSpeed need it)
    wrapper = getattr(loss_model, "_orig_mod", loss_model)  # torch.compile's
    model = (loss_model if acc.distributed_type == DistributedType.NO
             else wrapper.module if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel)
             else acc.unwrap_model(loss_model)).model
    gathered = contextlib.nullcontext()
    if acc.distributed_type == DistributedType.DEEPSPEED:  # ZeRO-3 partitions parameters; else a no-op
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad],
                                                     modifier_rank=None)
    with gathered:  # FSDP2: each tensor is a DTensor shard, full_tensor() gathers it (a collective)
        return {KEY_PREFIX + k: (v.full_tensor() if isinstance(v, DTensor) else v).to("cpu", torch.float32, copy=True)
                for k, v in lora_state_dict(model).items()}


def evaluate(loss_model, examples: list[Example], batch_size: int, pad_id: int, acc) -> float:
    """Mean loss per loss token over `examples` (each process takes every P-th batch)."""
    loss_model.eval()
    total = torch.zeros((), device=acc.device, dtype=torch.float64)
    count = torch.zeros((), device=acc.device, dtype=torch.float64)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rounds = -(-len(batches) // acc.num_processes)
    with torch.no_grad():
        for bi in range(acc.process_index, rounds * acc.num_processes, acc.num_processes):
            # every process runs as many forwards as the others (DDP's and FSDP's forwards are collectives: one
            # process skipping its last waited forever); past the batches, one is run again and not counted
            b = _to(collate([examples[i] for i in batches[min(bi, len(batches) - 1)]], pad_id), acc.device)
            s, n = loss_model(**b)
            if bi < len(batches):
                total += s.double()
                count += n.double()
    total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
    if acc.distributed_type == "FSDP":
        _reshard(loss_model)
    return float(total / count)


def _reshard(model) -> None:
    """FSDP2 leaves the root module's parameters gathered after a forward with no backward (an eval): the model's
    parameters were then not the optimizer's, and saving the optimizer state failed (KeyError). Shard them again."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _add_to_row(path: Path, step: int, **values) -> None:
    """Add values to the metrics row of `step`, the last one (a new row if it has none: it ended a window of
    --log-every steps that a stop cut short)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and rows[-1]["step"] == step:
        rows[-1].update(values)
    else:
        rows.append({"step": step, **values})
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _truncate_metrics(path: Path, step: int) -> list[int]:
    """On resume, drop rows logged after the checkpoint (they will be logged again), and a row cut short
    by a crash or a full disk. Returns the numbers of other lines that were not metric rows (dropped too)."""
    if not path.is_file():
        return []
    rows, bad = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            if number < len(lines) and line.strip():  # the last line is the one a crash cuts short
                bad.append(number)
        elif row["step"] <= step:
            rows.append(line)
    atomic_write_text(path, "".join(r + "\n" for r in rows))
    return bad


def _last_good(run_dir: Path) -> str:
    """Where training can go on from after a failure: the newest checkpoint, if any."""
    found = list_checkpoints(run_dir)
    if not found:
        return " (no checkpoint was saved)"
    return f" (the last good checkpoint is kept: {found[-1][1]})"


def _require_finite(tensors: dict[str, torch.Tensor], step: int, run_dir: Path, acc) -> None:
    """Never save a checkpoint of inf / NaN weights: an update can blow them up while the loss that led to
    it was finite. Every process takes the same decision (one reduce)."""
    bad = sum(1 for t in tensors.values() if not torch.isfinite(t).all())
    if acc.num_processes > 1:
        bad = int(acc.reduce(torch.tensor(bad, device=acc.device), "sum"))
    if bad:
        raise UserError(f"the adapter weights became inf or NaN at step {step} ({bad} tensors); lower --lr, or keep "
                        "--max-grad-norm on" + _last_good(run_dir), shared=True)


def set_aside_final_files(run_dir: Path) -> None:
    """A resumed run takes away what says it finished (the summary first, then the adapter): stopped again, it is
    a run that has not finished, which merge, export and generate say, naming its newest checkpoint, instead of
    using the adapter of the end it no longer has. The run's end writes them again."""
    for name in (SUMMARY_FILE, CONFIG_NAME, WEIGHTS_NAME, LOSS_PLOT):
        (run_dir / name).unlink(missing_ok=True)


def clear_run_files(run_dir: Path) -> None:
    """A fresh run (--force) starts without an earlier run's files (no stale metrics or checkpoints)."""
    import shutil

    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def probe_forward(loss_model, example: Example, pad_id: int, device, layers: dict | None = None) -> list[str]:
    """A forward of a few tokens, without gradients or dropout, before the first step: the LoRA layers learn
    which siblings read one input (q/k/v) and compute those fused from then on, so every step, the first
    of a resumed run too, does the same arithmetic.

    Returns the LoRA layers (of `layers`, by path) that never ran: model code that reads a projection's
    weight directly (Mamba's dt_proj) bypasses its LoRA, which then cannot learn. MoE experts are left out:
    a few tokens reach only some of them."""
    n = min(4, len(example.input_ids))
    probe = Example(input_ids=example.input_ids[:n], labels=[IGNORE] * n)
    ran: set[str] = set()
    layers = layers or {}
    hooks = [layer.register_forward_hook(lambda *_, path=path: ran.add(path)) for path, layer in layers.items()]
    loss_model.eval()
    try:
        with torch.no_grad():
            loss_model(**_to(collate([probe], pad_id), device))
    finally:
        for h in hooks:
            h.remove()
    return [p for p in layers if p not in ran and ".experts." not in p]


# layer kinds (config.layer_types, layers_block_type, block_types) and config keys of layers that carry a state
# along the sequence (Mamba, short convolutions, linear attention, RG-LRU): a mask between records cannot stop it
STATEFUL_KIND = re.compile(r"linear|conv|recurr|mamba|ssm|hybrid|rwkv|lstm|delta", re.IGNORECASE)
STATEFUL_KEYS = ("mamba_", "ssm_", "conv_L_cache", "conv_kernel", "conv1d_width", "lru_width", "linear_conv_kernel_dim",
                 "short_conv_kernel_size")


def stateful_layers(config) -> str | None:
    """What in a model's config says that some of its layers carry a state from one token to the next (LFM2's
    convolutions, Qwen3-Next's and MiniMax's linear attention, Jamba's and Falcon-H1's Mamba, RecurrentGemma's
    recurrence), or None."""
    try:
        text = config.get_text_config(decoder=True)
    except (AttributeError, ValueError):  # (no sub-configs, or several and none the decoder)
        text = config
    configs = [config] + ([text] if text is not config else [])
    for c in configs:
        for key in ("layer_types", "layers_block_type", "block_types"):
            kinds = getattr(c, key, None)
            found = sorted({str(k) for k in kinds if STATEFUL_KIND.search(str(k))}) if isinstance(kinds, (list, tuple)) else []
            if found:
                return f"its config's {key} lists {', '.join(found)} layers"
        if "M" in str(getattr(c, "hybrid_override_pattern", "") or ""):
            return "its config's hybrid_override_pattern has Mamba layers"
        keys = sorted(k for k, v in vars(c).items() if k.startswith(STATEFUL_KEYS) and v is not None)
        if keys:
            return f"its config sets {keys[0]}"
    return None


def check_packing(loss_model, model, example: Example, pad_id: int, device, dtype) -> None:
    """--packing needs a model that takes per-record position ids and a block-diagonal attention mask, and
    whose layers carry nothing along the sequence but attention. Refused: a model whose config names such layers
    (`stateful_layers`); one whose record, a few tokens, gets another loss behind another record than behind a
    copy of itself (it sees through the mask: behind either, a model that keeps records apart computes the same
    numbers; a random tiny LFM2 differs by 1e-6, a trained model by far more); one where it gets another loss than
    alone (position ids not restarted); one that fails on the 4-D mask."""
    model_name = type(model).__name__
    if why := stateful_layers(model.config):
        raise UserError(f"--packing: {model_name} has layers that carry a state from one token to the next ({why}): "
                        "a record packed behind another would start from that record's state, which an attention "
                        "mask cannot stop; train without --packing")
    ids = example.input_ids[:8]
    alone = Example(ids, list(ids))
    other = [t + 1 if t == 0 else t - 1 for t in ids]  # another record: a different token everywhere
    losses = []
    loss_model.eval()
    with torch.no_grad():
        one = float(loss_model(**_to(collate([alone], pad_id), device))[0])
        for prefix in (ids, other):
            (packed,) = pack([Example(prefix, list(prefix)), alone], 2 * len(ids))
            packed.labels[: len(ids)] = [IGNORE] * len(ids)  # the loss on the second record only
            try:
                losses.append(float(loss_model(**_to(collate([packed], pad_id), device))[0]))
            except Exception as e:  # the model's attention rejects the 4-D mask or the position ids
                raise UserError(f"--packing: {model_name} does not take a per-record attention mask "
                                f"({type(e).__name__}: {e}); train without --packing") from None
    two, behind_other = losses
    # relative. Behind a copy or another record: equal bit for bit on a CPU where records are kept apart (MoE
    # kernels on a GPU may group tokens otherwise). Against alone: SmolLM2-135M, a leak moves the loss by 34%, and
    # rounding alone by 2e-7 in fp32 (tiny models of 20 architectures too) and 5e-3 in bf16 (half precision rounds
    # differently per sequence length); a random tiny BART, whose positions go on past a record, by 9e-4
    full = dtype == torch.float32
    if abs(two - behind_other) > (1e-5 if full else 1e-2) * abs(one):
        raise UserError(f"--packing: records packed together see each other in {model_name} (a record's loss is "
                        f"{two:.7g} behind a copy of itself and {behind_other:.7g} behind another record); train "
                        "without --packing")
    if abs(two - one) > (1e-5 if full else 0.1) * abs(one):
        raise UserError(f"--packing: {model_name} computes a packed record otherwise than the record alone (its loss "
                        f"is {two:.6g} packed behind a record, {one:.6g} alone: the model does not restart positions "
                        "at each record); train without --packing")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _summary(cfg, state, plan, engine, world, tstats, estats, report, device) -> dict:
    return {
        "steps": state["step"],
        "total_steps": plan.total_steps,
        "epochs": round(state["step"] / plan.steps_per_epoch, 4),
        "loss_tokens_seen": state["loss_tokens_seen"],
        "world_size": world,
        "parallelism": engine,
        "global_batch": plan.global_size,
        "wall_time_s": round(state["wall_time_s"], 2),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "final_loss": state["last_loss"],
        "eval_loss": state["eval_history"][-1]["eval_loss"] if state["eval_history"] else None,
        "best_eval_loss": state["best_eval_loss"],
        "best_eval_step": state["best_eval_step"],
        "eval_history": state["eval_history"],
        "trainable_params": report.trainable,
        "total_params": report.total,
        "data_shape": tstats.shape,
        "train_records": tstats.records,
        "train_examples": tstats.examples,
        "dropped_no_loss": tstats.dropped_no_loss,
        "truncated": tstats.truncated,
        "chunked": tstats.chunked,  # text records split at --max-length
        "packed_sequences": tstats.packed or None,  # what --packing made of train_examples
        "eval_records": estats.records if estats else 0,
        "eval_examples": estats.examples if estats else 0,
        "eval_dropped_no_loss": estats.dropped_no_loss if estats else 0,
        "eval_truncated": estats.truncated if estats else 0,
    }


def _before_table(cfg, source, model, report, paths, tstats, estats, plan, engine, world, device, dtype):
    kinds = sorted({p.split(".")[-1] for p in paths})
    rows = [
        ("model", f"{cfg.model}{f' at revision {cfg.revision}' if cfg.revision else ''} ({type(model).__name__}"
                  f"{', dequantized GGUF' if source.is_gguf else ''})"),
        ("device", f"{device} · {str(dtype).replace('torch.', '')} · {world} process{'es' if world > 1 else ''}"
                   f"{f' ({engine})' if world > 1 else ''}"),
        ("parameters", str(report)),
        ("LoRA", f"r={cfg.rank} alpha={cfg.lora_alpha:g} dropout={cfg.dropout}{' rsLoRA' if cfg.rslora else ''}"
                 f"{' DoRA' if cfg.dora else ''}"),
        ("targets", f"{counted(len(paths), 'module')}: {', '.join(kinds)}"),
        ("data", f"{counted(tstats.records, 'record')} ({tstats.shape}) → {counted(tstats.examples, 'sequence')}, {tstats.tokens:,} tokens, "
                 f"{tstats.loss_tokens:,} with loss"),
    ]
    if tstats.packed:
        rows.append(("packing", f"{tstats.examples:,} sequences packed into {tstats.packed:,} of ≤ {cfg.max_length} tokens"))
    rows += _losses(tstats, cfg.max_length, "learn", "the model learns to say nothing there")
    if estats:
        rows.append(("eval", f"{counted(estats.records, 'record')} → {counted(estats.examples, 'sequence')}, "
                             f"{estats.loss_tokens:,} loss tokens"))
        rows += _losses(estats, cfg.max_length, "score", "the eval loss scores saying nothing there")
    rows.append(("steps", f"{plan.total_steps} (global batch {plan.global_size} = {cfg.batch_size} × {world} × "
                          f"{cfg.grad_accum}; warmup {plan.warmup}; {cfg.scheduler})"))
    rows.append(("output", cfg.output))
    return kv_table("lora train", rows)


def _losses(stats, max_length: int, verb: str, empty_means: str) -> list[tuple[str, str]]:
    """Rows on what the length limit and empty answers did to a set's records (train: `verb` learn; eval: score)."""
    rows = []
    if stats.dropped_no_loss or stats.truncated or stats.chunked:
        without = f" ({stats.no_answer:,} without an assistant turn to learn)" if stats.no_answer else ""
        rows.append(("", f"dropped {stats.dropped_no_loss:,} with nothing to {verb}{without} · truncated "
                         f"{stats.truncated:,} · chunked {stats.chunked:,} (max length {max_length})"))
    if stats.empty_answers:
        rows.append(("warning", f"{stats.empty_answers} record{'s answer' if stats.empty_answers > 1 else ' answers'} with "
                                f"nothing (an empty completion, output or assistant turn: an empty CSV cell?); "
                                f"{empty_means}"))
    return rows


def _after_table(summary: dict, run_dir: Path, drew: bool):
    rows = [
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s training, after {summary['setup_s']:.1f} s loading and tokenizing"),
        ("peak memory", f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"),
    ]
    if summary["eval_loss"] is not None:
        rows.insert(1, ("eval loss", f"{summary['eval_loss']:.4f} (best {summary['best_eval_loss']:.4f} at step "
                                     f"{summary['best_eval_step']})"))
    rows.append(("adapter", f"{run_dir}/adapter_model.safetensors"))
    if drew:
        rows.append(("loss curve", f"{run_dir}/{LOSS_PLOT}"))
    return kv_table("done", rows)


def _next_commands(run_dir: Path, model: str, allow_pickle: bool = False, remote_code: bool = False,
                   revision: str | None = None) -> str:
    """What to run next; printed with soft_wrap (one line each): a command broken inside a quoted path does
    not paste. A base read with --allow-pickle needs it again (generate, merge); one with its own code, to run
    (generate)."""
    q = shlex.quote
    pickle = " --allow-pickle" if allow_pickle else ""
    code = " --trust-remote-code" if remote_code else ""
    at = f" --revision {q(revision)}" if revision else ""
    return (f"lora generate --model {q(model)}{at} --adapter {q(str(run_dir))} --prompt '…'{pickle}{code}\n"
            f"lora merge {q(str(run_dir))} --output {q(f'{run_dir}-merged')}{pickle}\n"
            f"lora export {q(str(run_dir))} --output {q(f'{run_dir}-adapter')}")
