from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from models.base import Strict


def sft(*names: str, weights: bool = True) -> dict[str, Any]:
    """A TrainConfig field's metadata (`json_schema_extra`): the TRL `SFTConfig` fields it sets, and
    `weights=False` for a field that does not change the trained weights (left out of the model's key,
    `tasks.train.train_hash`)."""
    return {"sft": list(names), **({} if weights else {"weights": False})}


NOT_WEIGHTS = sft(weights=False)


class LoraSettings(Strict):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names the adapters wrap, or 'all-linear'")
    merge: bool = Field(True, description="save the final model with the adapters merged (loadable by any engine); "
                                          "the adapter alone is kept beside it")


class TrainConfig(Strict):
    """Supervised fine-tuning on the run's sft_data shards (the paper: lr 2e-6 -> 2e-7, warm-up 0.1,
    global batch 128, ~300 steps, sequence length 8192)."""

    enabled: bool = Field(False, description="end build_dataset with fine-tuning and evaluation",
                          json_schema_extra=NOT_WEIGHTS)
    model: str | None = Field(None, description="student model: local path, HF id or the bundled model "
                                                "(default: the run's engine model, i.e. self-alignment)")
    method: Literal["full", "lora"] = Field("full", description="full fine-tuning or LoRA adapters (peft)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    epochs: float = Field(5.0, gt=0, description="passes over the training split (ignored when max_steps > 0)",
                          json_schema_extra=sft("num_train_epochs"))
    max_steps: int = Field(-1, description="optimizer steps; > 0 overrides epochs", json_schema_extra=sft("max_steps"))
    learning_rate: float = Field(2e-6, gt=0, description="peak learning rate", json_schema_extra=sft("learning_rate"))
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warm-up, down to learning_rate * min_lr_ratio")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr (paper: 2e-7 / 2e-6)")
    # transformers 5 has no warmup_ratio: its warmup_steps below 1 is the share of the total steps (hence lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the optimizer steps spent warming up",
                                json_schema_extra=sft("warmup_steps"))
    weight_decay: float = Field(0.0, ge=0, json_schema_extra=sft("weight_decay"))
    max_grad_norm: float = Field(1.0, gt=0, json_schema_extra=sft("max_grad_norm"))
    per_device_batch_size: int = Field(
        4, ge=1, json_schema_extra=sft("per_device_train_batch_size", "per_device_eval_batch_size"))
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="global batch = per_device_batch_size * gradient_accumulation_steps * processes",
        json_schema_extra=sft("gradient_accumulation_steps"))
    max_seq_length: int = Field(2048, ge=16, description="longer sessions are truncated (tokens)",
                                json_schema_extra=sft("max_length"))
    packing: bool = Field(False, description="pack several sessions into one max_seq_length sequence (TRL BFD)",
                          json_schema_extra=sft("packing"))
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, else fp32")
    gradient_checkpointing: bool = Field(False, json_schema_extra=sft("gradient_checkpointing"))
    seed: int | None = Field(None, description="training seed (default: the run seed)")
    save_steps: int = Field(100, ge=1, description="checkpoint every N optimizer steps (resume point after a crash)",
                            json_schema_extra=sft("save_steps", weights=False))
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept",
                                  json_schema_extra=sft("save_total_limit", weights=False))
    logging_steps: int = Field(10, ge=1, json_schema_extra=sft("logging_steps", weights=False))
    eval_validation: bool = Field(True, description="report the loss on the validation split at the end")
    output_name: str = Field("{run_id}-{hash}", description="model id in the catalog; fields {run_id}, {hash}, "
                                                            "{model} (basename of the student model)",
                             json_schema_extra=NOT_WEIGHTS)
    launcher: Literal["inprocess", "accelerate"] = Field(
        "inprocess", description="inprocess: train in the flow process; accelerate: `accelerate launch` a "
                                 "subprocess (multi-GPU, FSDP/DeepSpeed) and register its result",
        json_schema_extra=NOT_WEIGHTS)
    accelerate_config: str | None = Field(
        None, description="accelerate config file (deploy/accelerate/fsdp.yaml, deepspeed_zero3.yaml)",
        json_schema_extra=NOT_WEIGHTS)
    num_processes: int | None = Field(None, ge=1, description="accelerate: processes (GPUs); default: the config's",
                                      json_schema_extra=NOT_WEIGHTS)

    @classmethod
    def not_weights(cls) -> set[str]:
        """The fields marked `weights=False`: how and where training runs, not what it learns."""
        return {n for n, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("weights") is False}

    def sft_kwargs(self) -> dict[str, Any]:
        """The TRL SFTConfig arguments these settings give, by each field's `sft` metadata. Settings that TRL
        takes in another form (scheduler, precision, seed, LoRA) are computed in tasks/train.py."""
        return {name: getattr(self, field) for field, info in type(self).model_fields.items()
                for name in (info.json_schema_extra or {}).get("sft", [])}
