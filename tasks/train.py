"""Supervised fine-tuning on sft_data shards with TRL's SFTTrainer, driven by TrainConfig.

Sessions are tokenized here from their `messages` with the student's chat template, labels -100 on
every non-assistant token (`tasks.sft_data.assistant_token_mask`), and handed to SFTTrainer already
tokenized. Checkpoints go to `out_dir/checkpoint-N`; a rerun resumes from the newest one. The final
model is written to `out_dir/final` (LoRA: adapters merged; the adapter alone in `out_dir/adapter`), then
`out_dir/result.json`; a folder with result.json is done and is not trained again.

This function never touches the catalog: the flow registers the result (flows/train.py).
Multi-GPU: `accelerate launch --config_file deploy/accelerate/fsdp.yaml -m tasks.train --home H --run-id R`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from models.config.train import TrainConfig
from models.ids import content_hash
from tasks.sft_data import assistant_token_mask, read_examples

RESULT = "result.json"


class TrainResult(BaseModel):
    model_id: str
    model_path: str = Field(description="the final model folder (full weights, loadable by any engine)")
    adapter_path: str | None = None
    base_model: str = Field(description="the student model as configured (name or path)")
    base_model_path: str
    data_hash: str
    train_hash: str
    out_dir: str
    resumed_from: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


def data_hash(paths: list[str | Path]) -> str:
    """Content hash of the training data: row ids, splits and messages, independent of file layout."""
    rows = [(ex.id, ex.split, [m.model_dump() for m in ex.messages]) for ex in read_examples(paths)]
    return content_hash(rows)


def train_hash(config: TrainConfig, base_model: str, data_digest: str) -> str:
    """The training folder's key: data, student model and every setting that changes the weights."""
    cfg = config.model_dump(mode="json", exclude={"enabled", "output_name", "launcher", "accelerate_config",
                                                  "num_processes", "save_steps", "save_total_limit",
                                                  "logging_steps"})
    return content_hash({"data": data_digest, "model": base_model, "train": cfg})


def train_dir(home: str | Path, run_id: str, key: str) -> Path:
    return Path(home) / "runs" / run_id / "train" / key


def model_id_for(config: TrainConfig, run_id: str, key: str, base_model: str) -> str:
    name = Path(base_model.rstrip("/")).name.replace("bundled:", "") or "model"
    return config.output_name.format(run_id=run_id, hash=key, model=name)


def last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not out_dir.is_dir():
        return None
    try:
        return get_last_checkpoint(str(out_dir))
    except Exception:  # noqa: BLE001 - an unreadable folder means no checkpoint to resume
        return None


def _precision(config: TrainConfig) -> tuple[bool, bool]:
    import torch

    if config.precision == "bf16":
        return True, False
    if config.precision == "fp16":
        return False, True
    if config.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return True, False
    return False, False


def _scheduler(config: TrainConfig) -> tuple[str, dict[str, Any]]:
    if config.lr_scheduler == "cosine":
        return "cosine_with_min_lr", {"min_lr_rate": config.min_lr_ratio}
    if config.lr_scheduler == "linear":  # linear decay to lr * min_lr_ratio
        return "polynomial", {"lr_end": config.learning_rate * config.min_lr_ratio, "power": 1.0}
    return "constant_with_warmup", {}


def tokenize_examples(examples: list, tokenizer, max_length: int):
    """A datasets.Dataset of {input_ids, labels} (assistant tokens only in the loss); fully masked rows dropped."""
    import datasets

    rows = []
    for ex in examples:
        ids, labels = assistant_token_mask(tokenizer, [m.model_dump() for m in ex.messages], max_length)
        if any(lbl != -100 for lbl in labels):
            rows.append({"input_ids": ids, "labels": labels})
    return datasets.Dataset.from_list(rows, features=datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int64"))}))


def _resolve(model: str) -> str:
    from engines.bundled import resolve_model

    return resolve_model(model)


def train_model(config: TrainConfig, data_paths: list[str | Path], out_dir: str | Path, *, base_model: str,
                seed: int = 0, run_id: str = "", resume: bool = True, force: bool = False,
                callbacks: list | None = None, data_digest: str | None = None) -> TrainResult:
    """Fine-tune `config.model or base_model` on the train split of the sft_data shards at `data_paths`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(out_dir)
    student = config.model or base_model
    digest = data_digest or data_hash(data_paths)
    key = train_hash(config, student, digest)
    if (out / RESULT).is_file() and not force:
        return TrainResult.model_validate_json((out / RESULT).read_text())
    if force and out.exists():
        shutil.rmtree(out)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    seed = config.seed if config.seed is not None else seed
    set_seed(seed)
    path = _resolve(student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = read_examples(data_paths)
    train_rows = [e for e in examples if e.split == "train"]
    val_rows = [e for e in examples if e.split == "validation"]
    if not train_rows:
        raise ValueError(f"no training examples in {len(data_paths)} sft_data shard(s)")
    train_ds = tokenize_examples(train_rows, tokenizer, config.max_seq_length)
    val_ds = tokenize_examples(val_rows, tokenizer, config.max_seq_length) if val_rows and config.eval_validation \
        else None
    bf16, fp16 = _precision(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if config.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    scheduler, scheduler_kwargs = _scheduler(config)
    args = SFTConfig(
        output_dir=str(out), num_train_epochs=config.epochs, max_steps=config.max_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=scheduler, lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, max_length=config.max_seq_length,
        packing=config.packing, bf16=bf16, fp16=fp16, gradient_checkpointing=config.gradient_checkpointing,
        seed=seed, data_seed=seed, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, logging_steps=config.logging_steps, report_to="none",
        eval_strategy="no", dataset_num_proc=None, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    resumed_from = last_checkpoint(out) if resume else None
    t0 = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=resumed_from)
    metrics: dict[str, Any] = {k: v for k, v in train_out.metrics.items() if isinstance(v, int | float)}
    metrics.update(global_step=trainer.state.global_step, train_examples=len(train_ds),
                   validation_examples=len(val_ds) if val_ds is not None else 0,
                   train_tokens=sum(len(x) for x in train_ds["input_ids"]),
                   loss_tokens=sum(sum(1 for t in x if t != -100) for x in train_ds["labels"]),
                   seconds=round(time.perf_counter() - t0, 2))
    if val_ds is not None and len(val_ds):
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, int | float)})

    final, adapter = out / "final", None
    tmp = out / ".final-tmp"
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp if config.method == "full" else out / "adapter"))  # collective under FSDP
    if config.method == "lora":
        adapter = out / "adapter"
    if trainer.is_world_process_zero():
        if config.method == "lora":
            _merge_adapter(path, adapter, tmp, merge=config.lora.merge)
        tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    result = TrainResult(
        model_id=model_id_for(config, run_id, key, student), model_path=str(final),
        adapter_path=str(adapter) if adapter else None, base_model=student, base_model_path=path, data_hash=digest,
        train_hash=key, out_dir=str(out), resumed_from=resumed_from, metrics=metrics,
        config=config.model_dump(mode="json"))
    if trainer.is_world_process_zero():
        tmp_result = out / f".{RESULT}.tmp"
        tmp_result.write_text(result.model_dump_json(indent=1))
        os.replace(tmp_result, out / RESULT)
    return result


def _merge_adapter(base_path: str, adapter: Path, dest: Path, merge: bool) -> None:
    """Load base + adapter from disk and save the merged weights (works the same after FSDP/DeepSpeed)."""
    if not merge:
        shutil.copytree(adapter, dest, dirs_exist_ok=True)
        return
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(dest), safe_serialization=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m tasks.train`: reads the run's config and sft_data shard paths from
    the catalog snapshot (read-only), trains, writes result.json. The flow registers the result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key.path=value")
    args = p.parse_args(argv)
    from flows.train import plan_training

    plan = plan_training(args.run_id, args.home, args.overrides)
    train_model(plan["config"].train, plan["paths"], args.out_dir, base_model=plan["base_model"],
                seed=plan["config"].seed, run_id=args.run_id, data_digest=plan["data_hash"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
