"""Supervised fine-tuning on sft_data shards with TRL's SFTTrainer, driven by TrainConfig.

Sessions are tokenized here from their `messages` with the student's chat template, labels -100 on
every non-assistant token (`tasks.chat_template.assistant_token_mask`), and handed to SFTTrainer already
tokenized. Checkpoints go to `out_dir/checkpoint-N`; a call resumes from the newest one. The final model is
written to `out_dir/final` (LoRA: adapters merged; the adapter alone in `out_dir/adapter`).

This module never touches the catalog: the flow (flows/train.py) plans (`TrainPlan`), looks the model up
in the catalog under its key (`train_hash`) and registers the result. Multi-GPU: the flow runs
`accelerate launch -m tasks.train --plan PLAN.json --result RESULT.json` and registers what it hands back.
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
from storage.layout import RunLayout
from tasks.chat_template import assistant_token_mask
from tasks.sft_data import read_examples


class TrainPlan(BaseModel):
    """Everything one training needs, planned by the flow from the catalog (and handed to a launched
    subprocess as JSON)."""

    train: TrainConfig
    paths: list[str] = Field(description="the run's sft_data shard files")
    base_model: str = Field(description="the student model as configured (name or path)")
    seed: int = Field(description="the training seed (train.seed, else the run seed)")
    run_id: str
    data_hash: str
    key: str = Field(description="train_hash: the model's content key")
    out_dir: str


class TrainResult(BaseModel):
    model_id: str
    model_path: str = Field(description="the final model folder (full weights, loadable by any engine)")
    adapter_path: str | None = None
    base_model: str = Field(description="the student model as configured (name or path)")
    base_model_path: str
    data_hash: str
    train_hash: str
    out_dir: str
    resumed_from: str | None = Field(None, description="the checkpoint training resumed from")
    reused_from: str | None = Field(None, description="the run whose registered model this is (not trained again)")
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


def data_hash(paths: list[str | Path]) -> str:
    """Content hash of the training data: row ids, splits and messages, independent of file layout."""
    rows = [(ex.id, ex.split, [m.model_dump() for m in ex.messages]) for ex in read_examples(paths)]
    return content_hash(rows)


def train_hash(config: TrainConfig, base_model: str, data_digest: str) -> str:
    """The model's key: data, student model and every setting that changes the weights (all but the fields
    marked `weights=False` in TrainConfig)."""
    cfg = config.model_dump(mode="json", exclude=TrainConfig.not_weights())
    return content_hash({"data": data_digest, "model": base_model, "train": cfg})


def train_dir(home: str | Path, run_id: str, key: str) -> Path:
    return RunLayout(Path(home), run_id).train(key)


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


def train_model(plan: TrainPlan, *, resume: bool = True, callbacks: list | None = None) -> TrainResult:
    """Fine-tune `plan.base_model` on the train split of the sft_data shards at `plan.paths`, in
    `plan.out_dir` (resuming from its newest checkpoint unless `resume=False`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(plan.out_dir)
    config, student, seed = plan.train, plan.base_model, plan.seed

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)
    path = _resolve(student)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = read_examples(plan.paths)
    train_rows = [e for e in examples if e.split == "train"]
    val_rows = [e for e in examples if e.split == "validation"]
    if not train_rows:
        raise ValueError(f"no training examples in {len(plan.paths)} sft_data shard(s)")
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
        **config.sft_kwargs(), output_dir=str(out), lr_scheduler_type=scheduler, lr_scheduler_kwargs=scheduler_kwargs,
        bf16=bf16, fp16=fp16, seed=seed, data_seed=seed, save_strategy="steps", report_to="none", eval_strategy="no",
        dataset_num_proc=None, disable_tqdm=True)
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
    return TrainResult(
        model_id=model_id_for(config, plan.run_id, plan.key, student), model_path=str(final),
        adapter_path=str(adapter) if adapter else None, base_model=student, base_model_path=path,
        data_hash=plan.data_hash, train_hash=plan.key, out_dir=str(out), resumed_from=resumed_from, metrics=metrics,
        config=config.model_dump(mode="json"))


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
    """Entry point for `accelerate launch -m tasks.train`: trains the plan the flow wrote, and (process 0)
    hands the result back in `--result` for the flow to register."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", required=True, help="TrainPlan JSON written by flows/train.py")
    p.add_argument("--result", required=True, help="where process 0 writes the TrainResult JSON")
    args = p.parse_args(argv)
    result = train_model(TrainPlan.model_validate_json(Path(args.plan).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = Path(f"{args.result}.tmp")
        tmp.write_text(result.model_dump_json(indent=1))
        os.replace(tmp, args.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
