//! Every training option, by TRL's name, in one place with its default.
//!
//! An option is set, in order of precedence, on the command line, in a student config's
//! `[training]` table, or by [`TrainingOptions::defaults`]. The command line and the config file
//! fill the same struct (`None` = not given), so an option is declared once for both.

use serde::{Deserialize, Serialize};

/// Training options; `None` is "not given here".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainingOptions {
    /// Peak learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// cosine (to --min-lr-ratio), linear or constant, after the warmup.
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    /// Floor of the cosine schedule, as a fraction of the learning rate (cosine_with_min_lr).
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// Fraction of the steps spent warming the learning rate up from 0.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Optimizer steps; overrides --num-train-epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Longest row in tokens; longer rows are dropped (or cut with --truncate), and counted.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Cut rows longer than --max-length instead of dropping them.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub truncate: Option<bool>,
    /// Rows (or packed blocks) per forward pass on each device.
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Global gradient-norm clipping (0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Decoupled weight decay on matrices (not norms or biases).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Compute dtype of the forward and backward passes over f32 master weights: f32, or bf16
    /// where the device computes it (cuda, metal, flex); a config's bf16 falls back to f32,
    /// with a note, on a device without it.
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    pub dtype: Option<String>,
    /// Keep only each decoder layer's input for the backward pass and run the layer again
    /// there (transformers' gradient_checkpointing_enable): much less memory, ~1/3 more compute.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Keep those layer inputs in host memory and bring each back for its layer's backward pass
    /// (TRL's activation_offloading): a GPU then holds one layer's input at a time. Implies
    /// --gradient-checkpointing; on flex, whose memory is the host's, it changes nothing.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub activation_offloading: Option<bool>,
    /// With --devices: each device keeps the AdamW moments, the gradient sum and (under mixed
    /// precision) the f32 master weights of its share of the parameters only (ZeRO stage 2), so
    /// optimizer memory per device falls by the number of devices.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub shard_optimizer: Option<bool>,
    /// Train LoRA adapters of this rank instead of every weight (the base stays frozen; the
    /// adapters are merged into the weights on export).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// QLoRA: hold the frozen base's projections quantized to 4 bits per value (blocks of 32,
    /// f16 scales; bitsandbytes' flag name), dequantized per matmul; needs --lora-rank.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub load_in_4bit: Option<bool>,
    /// The same with 8-bit values.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub load_in_8bit: Option<bool>,
    /// LoRA scaling numerator (update × alpha / rank); default 2 × rank.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapters' input (PEFT's lora_dropout).
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Projections to adapt: comma-separated q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    /// down_proj, or all-linear.
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Pack rows into max_length blocks (attention never crosses rows).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Also train on prompt tokens (default: completion-only loss).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub train_on_prompt: Option<bool>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// RoPE base frequency to train (and export) at, to extend a model's context on purpose:
    /// open-r1 trained Qwen2.5-Math-7B at 32k tokens with 300000 in place of its 10000.
    #[arg(long)]
    pub rope_theta: Option<f64>,
    /// The context the trained model declares (config.json), with --rope-theta.
    #[arg(long)]
    pub max_position_embeddings: Option<usize>,
    /// Write a checkpoint every N optimizer steps; 0: only at the end.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest N checkpoints, deleting older ones (0: keep all).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Evaluate every N optimizer steps (and at the end); 0: five times over the run.
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// dtype of the weights exported to final/. auto: bf16 over a 4- or 8-bit base (the merged
    /// QLoRA model, as bitsandbytes users save it), f32 otherwise (the weights as trained).
    #[arg(long, value_parser = ["auto", "f32", "bf16", "f16"])]
    pub export_dtype: Option<String>,
}

impl TrainingOptions {
    /// What an option is when neither the command line nor the student config sets it.
    pub fn defaults() -> Self {
        TrainingOptions {
            learning_rate: Some(2e-5),
            lr_scheduler: Some("cosine".into()),
            min_lr_ratio: Some(0.0),
            warmup_ratio: Some(0.0),
            num_train_epochs: Some(1.0),
            max_steps: None,
            max_length: Some(4096),
            truncate: Some(false),
            per_device_train_batch_size: Some(1),
            gradient_accumulation_steps: Some(1),
            max_grad_norm: Some(1.0),
            weight_decay: Some(0.0),
            adam_beta1: Some(0.9),
            adam_beta2: Some(0.999),
            adam_epsilon: Some(1e-8),
            dtype: Some("f32".into()),
            gradient_checkpointing: Some(false),
            activation_offloading: Some(false),
            shard_optimizer: Some(false),
            lora_rank: None,
            load_in_4bit: Some(false),
            load_in_8bit: Some(false),
            lora_alpha: None,
            lora_dropout: Some(0.05),
            lora_targets: Some("all-linear".into()),
            packing: Some(false),
            train_on_prompt: Some(false),
            seed: Some(42),
            rope_theta: None,
            max_position_embeddings: None,
            save_steps: Some(0),
            save_total_limit: Some(0),
            eval_steps: Some(0),
            export_dtype: Some("auto".into()),
        }
    }

    /// The bits of `--load-in-4bit` / `--load-in-8bit` (`None`: neither), or why they conflict.
    pub fn load_in_bits(&self) -> Result<Option<u8>, String> {
        match (self.load_in_4bit == Some(true), self.load_in_8bit == Some(true)) {
            (true, true) => Err("--load-in-4bit and --load-in-8bit exclude each other".into()),
            (true, false) => Ok(Some(4)),
            (false, true) => Ok(Some(8)),
            (false, false) => Ok(None),
        }
    }

    /// The dtype of final/'s weights: `export_dtype`, with `auto` resolved.
    pub fn export_dtype_name(&self) -> Result<&str, String> {
        Ok(match self.export_dtype.as_deref() {
            None | Some("auto") if self.load_in_bits()?.is_some() => "bf16",
            None | Some("auto") => "f32",
            Some(name) => name,
        })
    }

    /// Every option set here, else as in `fallback`.
    pub fn or(&self, fallback: &TrainingOptions) -> TrainingOptions {
        let serde_json::Value::Object(mine) = serde_json::to_value(self).expect("plain struct") else { unreachable!() };
        let serde_json::Value::Object(mut merged) = serde_json::to_value(fallback).expect("plain struct") else { unreachable!() };
        for (key, value) in mine {
            if !value.is_null() {
                merged.insert(key, value);
            }
        }
        serde_json::from_value(serde_json::Value::Object(merged)).expect("same struct")
    }

    /// The defaults as `--help` shows them.
    pub fn defaults_help() -> String {
        let serde_json::Value::Object(defaults) = serde_json::to_value(Self::defaults()).expect("plain struct") else { unreachable!() };
        let listed: Vec<String> =
            defaults.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| format!("--{} {}", k.replace('_', "-"), v.to_string().trim_matches('"'))).collect();
        format!(
            "Defaults, where neither the command line nor the student config's [training] table sets an option:\n  {}",
            listed.join("\n  ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_over_config_over_defaults() {
        let cli = TrainingOptions { learning_rate: Some(1e-3), packing: Some(false), ..Default::default() };
        let config = TrainingOptions { learning_rate: Some(4e-5), packing: Some(true), max_length: Some(32768), ..Default::default() };
        let merged = cli.or(&config).or(&TrainingOptions::defaults());
        assert_eq!(merged.learning_rate, Some(1e-3));
        assert_eq!(merged.packing, Some(false), "an explicit false on the command line wins");
        assert_eq!(merged.max_length, Some(32768));
        assert_eq!(merged.seed, Some(42));
        assert_eq!(merged.lora_rank, None);
        assert!(TrainingOptions::defaults_help().contains("--learning-rate 0.00002"));
    }
}
