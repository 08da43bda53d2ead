//! `distill train` as one library call: a [`JobSpec`] (what the command line says) is resolved
//! against the student config and the defaults into a [`Job`] that has checked everything it
//! can before a model is loaded (options, context length, data, the memory plan), and
//! [`Job::run`] trains it: resume, the loop, evaluation, checkpoints, the final export.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{DType, Device};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::checkpoint::{self, CheckpointError, TrainerState};
use super::optim::{AdamW, AdamWConfig};
use super::options::TrainingOptions;
use super::run::{StepMetrics, TrainConfig, steps_per_epoch, train};
use super::schedule::{Schedule, Scheduler};
use crate::data::batch::Batch;
use crate::data::cache::{self, CacheOutcome, TokenizedData};
use crate::data::packing::{BlockSource, PackedBlock, pack_indices};
use crate::data::records::DataError;
use crate::data::traces::{LengthPolicy, TraceFormat, TraceOptions};
use crate::export::{ExportDtype, ExportError, ExportOptions};
use crate::model::lora::LoraConfig;
use crate::model::{BaseStorage, LoadOptions, Model, ModelConfig, ModelError, Training};
use crate::plan::{MemoryPlan, PlanOptions};
use crate::pretrained::PretrainedError;
use crate::student::{StudentConfig, StudentError, model_config_from_any};
use crate::text::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Student(#[from] StudentError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Pretrained(#[from] PretrainedError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted: checkpoint-{step} saved in {dir}; continue with the same command and --resume")]
    Interrupted { step: usize, dir: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JobError + '_ {
    move |source| JobError::Io { path: path.to_path_buf(), source }
}

/// Where the starting weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The checkpoint's weights.
    Pretrained,
    /// The architecture, randomly initialised from the seed (tiny configs, tests, demos).
    Random,
}

/// Held-out rows to measure eval loss on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum EvalSource {
    None,
    /// This fraction of the rows, chosen by the seed.
    Split(f64),
    /// Rows of another dataset, in the same format.
    Data(PathBuf),
}

/// What the command line asks for.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// An HF checkpoint folder, or a student config whose `checkpoint` names one.
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub init: Init,
    pub format: TraceFormat,
    /// Options given on the command line (the student config and the defaults fill the rest).
    pub options: TrainingOptions,
    pub eval: EvalSource,
    pub resume: bool,
    /// The device to train on (without autodiff; the job adds it): the first of `devices`.
    pub device: Device,
    pub device_name: String,
    /// Data parallel: every device with its name, `device` first; empty: `device` alone.
    pub devices: Vec<(Device, String)>,
    /// The device's memory, for the plan check; `None`: the system's memory on the CPU, no
    /// check elsewhere (burn does not report a GPU's memory).
    pub device_memory: Option<u64>,
    /// Where tokenized data is cached; `None`: [`cache::default_root`].
    pub dataset_cache: Option<PathBuf>,
}

/// What the job tells the person running it.
pub trait Reporter: Sync {
    /// A line of information (stderr).
    fn note(&self, line: &str);
    /// Rows tokenized so far.
    fn tokenizing(&self, rows: usize);
    fn training_started(&self, total_steps: usize, first_step: usize);
    fn step(&self, metrics: &StepMetrics);
    fn training_finished(&self);
}

/// Tokenized examples chosen by index, materialized a block at a time.
struct Packed {
    data: Arc<TokenizedData>,
    blocks: Vec<Vec<usize>>,
}

impl BlockSource for Packed {
    fn len(&self) -> usize {
        self.blocks.len()
    }

    fn block(&self, index: usize) -> PackedBlock {
        let examples: Vec<_> = self.blocks[index].iter().map(|&i| self.data.example(i)).collect();
        PackedBlock::from_examples(&examples)
    }
}

/// A training run, resolved and checked.
pub struct Job {
    spec: JobSpec,
    /// Every option, resolved.
    pub options: TrainingOptions,
    pub config: ModelConfig,
    checkpoint_dir: Option<PathBuf>,
    tokenizer_dir: PathBuf,
    eos_token_ids: Vec<u32>,
    lora: Option<LoraConfig>,
    compute_dtype: Option<DType>,
    base: Base,
    train: Packed,
    eval: Option<Packed>,
    pub train_config: TrainConfig,
    pub plan: MemoryPlan,
    settings: serde_json::Value,
}

/// An option that the merge with the defaults always fills.
fn required<T: Clone>(value: &Option<T>, name: &str) -> T {
    value.clone().unwrap_or_else(|| panic!("{name} has a default"))
}

/// The compute dtype: `requested` if the device has it. A dtype that only the student config
/// asks for falls back to f32, with a note; one asked for on the command line is an error.
fn compute_dtype(requested: &str, from_command_line: bool, device: &Device, device_name: &str, reporter: &dyn Reporter) -> Result<Option<DType>, JobError> {
    let dtype = crate::device::dtype_named(requested).map_err(|e| JobError::Invalid(e.to_string()))?;
    if dtype == DType::F32 {
        return Ok(None);
    }
    if device.supports_dtype(dtype) {
        return Ok(Some(dtype));
    }
    if !from_command_line {
        reporter.note(&format!("note: the student config asks for {requested}, which {device_name} cannot compute; training in f32"));
        return Ok(None);
    }
    Err(JobError::Invalid(format!("{device_name} has no {requested} compute (Vulkan and WGSL have none for bf16); use --dtype f32")))
}

/// Applies `--rope-theta` / `--max-position-embeddings` and refuses a `max_length` the model
/// was not built for unless the context was extended on purpose.
pub fn extend_context(config: &mut ModelConfig, options: &TrainingOptions, max_length: usize) -> Result<(), JobError> {
    if let Some(theta) = options.rope_theta {
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(JobError::Invalid(format!("--rope-theta must be a positive number (got {theta})")));
        }
        config.rope_theta = theta;
    }
    if let Some(positions) = options.max_position_embeddings {
        config.max_position_embeddings = positions;
    }
    if max_length > config.max_position_embeddings {
        let hint = if options.max_position_embeddings.is_some() {
            "raise --max-position-embeddings, or lower --max-length".to_string()
        } else {
            format!(
                "lower --max-length, or extend the context on purpose with --rope-theta and --max-position-embeddings \
                 (open-r1 trained Qwen2.5-Math-7B at 32768 tokens with --rope-theta 300000 --max-position-embeddings 32768; \
                 the current rope_theta is {})",
                config.rope_theta
            )
        };
        return Err(JobError::Invalid(format!(
            "max_length {max_length} is longer than the model's max_position_embeddings {}: positions past it were never trained; {hint}",
            config.max_position_embeddings
        )));
    }
    Ok(())
}

fn lora_config(options: &TrainingOptions) -> Result<Option<LoraConfig>, JobError> {
    let Some(rank) = options.lora_rank else { return Ok(None) };
    let lora = LoraConfig {
        rank,
        alpha: options.lora_alpha.unwrap_or(2.0 * rank as f64),
        dropout: required(&options.lora_dropout, "lora_dropout"),
        targets: LoraConfig::parse_targets(&required(&options.lora_targets, "lora_targets")).map_err(JobError::Invalid)?,
    };
    lora.validate().map_err(JobError::Invalid)?;
    Ok(Some(lora))
}

/// Refuses a model whose largest tensor, held in `dtype`, is more than the device named
/// `device_name` can bind (see [`crate::device::tensor_limit`]): the run would fail in its first
/// kernel.
pub fn check_tensor_limit(config: &ModelConfig, device_name: &str, dtype: DType) -> Result<(), JobError> {
    let Some(limit) = crate::device::tensor_limit(device_name) else { return Ok(()) };
    let (name, [rows, columns]) = crate::plan::largest_tensor(config);
    let bytes = (rows * columns * dtype.size()) as u64;
    if bytes <= limit {
        return Ok(());
    }
    Err(JobError::Invalid(format!(
        "{device_name} binds at most {:.2} GiB per tensor (wgpu's storage-buffer limit), but {name} [{rows}, {columns}] in {dtype:?} is {:.2} GiB; \
         train this model on cuda or rocm, or as LoRA over a checkpoint's base in f16 (--lora-rank 16 --dtype f16 --init pretrained) where that fits",
        crate::info::gib(limit),
        crate::info::gib(bytes)
    )))
}

impl Job {
    /// Resolves and checks a run: options, context length, LoRA, tokenizer, data (tokenized or
    /// read from the cache), blocks, schedule and memory plan. Nothing under `out` is written.
    pub fn prepare(spec: JobSpec, reporter: &dyn Reporter) -> Result<Job, JobError> {
        if !spec.resume && spec.out.exists() && fs::read_dir(&spec.out).map_err(io(&spec.out))?.next().is_some() {
            return Err(JobError::Invalid(format!(
                "{} already exists and is not empty; continue it with --resume, or choose a new --out",
                spec.out.display()
            )));
        }
        let (mut config, student) = model_config_from_any(&spec.model)?;
        let from_config = student.as_ref().map(|s| s.training.clone()).unwrap_or_default();
        let options = spec.options.or(&from_config).or(&TrainingOptions::defaults());
        let max_length = required(&options.max_length, "max_length");
        extend_context(&mut config, &options, max_length)?;
        let mut compute_dtype = compute_dtype(&required(&options.dtype, "dtype"), spec.options.dtype.is_some(), &spec.device, &spec.device_name, reporter)?;
        for (device, name) in spec.devices.iter().skip(1) {
            if compute_dtype.is_some() {
                compute_dtype = self::compute_dtype(&required(&options.dtype, "dtype"), spec.options.dtype.is_some(), device, name, reporter)?;
            }
        }
        let lora = lora_config(&options)?;
        let bits = options.load_in_bits().map_err(JobError::Invalid)?;
        if bits.is_some() && lora.is_none() {
            return Err(JobError::Invalid(format!(
                "--load-in-{}bit quantizes the frozen base of a LoRA run (QLoRA); add --lora-rank (16 is a common choice)",
                bits.unwrap_or(4)
            )));
        }
        let base = Base::new(bits, compute_dtype);
        // Only a LoRA base read from a checkpoint is never held in f32 whole.
        let smaller_base = lora.is_some() && spec.init == Init::Pretrained && base.storage != BaseStorage::Full;
        for name in std::iter::once(&spec.device_name).chain(spec.devices.iter().map(|(_, name)| name)) {
            check_tensor_limit(&config, name, if smaller_base { base.dtype } else { DType::F32 })?;
        }
        let (checkpoint_dir, tokenizer_dir) = sources(&spec.model, student.as_ref())?;
        if spec.init == Init::Pretrained && checkpoint_dir.is_none() {
            return Err(JobError::Invalid("--init pretrained needs a checkpoint folder (or `checkpoint` in the student config)".into()));
        }
        let tokenizer = Tokenizer::from_dir(&tokenizer_dir)?;
        let eos_token_ids = crate::pretrained::eos_token_ids(&tokenizer_dir, &config.eos_token_ids)?;
        let seed = required(&options.seed, "seed");
        // The process as it stands before the token cache is read: the cache's pages are the
        // file's, which the kernel drops and reads back as it needs. On a GPU the host's memory
        // is not the device's, and the plan's estimate stands.
        let runtime_bytes = if spec.device_name == "flex" { crate::memory::current_bytes() } else { None };

        let trace_options = TraceOptions {
            format: spec.format.clone(),
            max_length,
            length_policy: if required(&options.truncate, "truncate") { LengthPolicy::Truncate } else { LengthPolicy::Drop },
            train_on_prompt: required(&options.train_on_prompt, "train_on_prompt"),
        };
        let cache_root = spec.dataset_cache.clone().unwrap_or_else(cache::default_root);
        let tokenize = |path: &Path| -> Result<Arc<TokenizedData>, JobError> {
            let (data, outcome) = cache::load_or_build(path, &tokenizer, &tokenizer_dir, &trace_options, &cache_root, &|rows| reporter.tokenizing(rows))?;
            match outcome {
                CacheOutcome::Reused => reporter.note(&format!("data: tokenized rows of {} read from {}", path.display(), data.dir.display())),
                CacheOutcome::Built => reporter.note(&format!("data: tokenized {} into {}", path.display(), data.dir.display())),
                CacheOutcome::Rebuilt(why) => reporter.note(&format!("data: the token cache of {} was damaged ({why}); tokenized again into {}", path.display(), data.dir.display())),
            }
            Ok(Arc::new(data))
        };
        let data = tokenize(&spec.data)?;
        let skipped = &data.meta.skipped;
        reporter.note(&format!("data: {} rows → {} examples ({})", data.meta.rows, data.len(), skipped.summary()));
        for (location, reason) in skipped.invalid.iter().take(5) {
            reporter.note(&format!("  skipped {location}: {reason}"));
        }
        if data.is_empty() {
            return Err(JobError::Invalid(format!("{}: no row can be trained on ({})", spec.data.display(), skipped.summary())));
        }
        if data.max_id as usize >= config.vocab_size {
            return Err(JobError::Invalid(format!(
                "{}: the tokenizer of {} writes token id {}, beyond the model's {}-entry vocabulary (vocab_size)",
                spec.data.display(), tokenizer_dir.display(), data.max_id, config.vocab_size
            )));
        }
        // Held-out rows: a seeded split of --data, or --eval-data.
        let all: Vec<usize> = (0..data.len()).collect();
        let (train_rows, eval) = match &spec.eval {
            EvalSource::Data(path) => {
                let eval = tokenize(path)?;
                reporter.note(&format!("eval data: {} examples ({})", eval.len(), eval.meta.skipped.summary()));
                let rows = (0..eval.len()).collect();
                (all, Some((eval, rows)))
            }
            EvalSource::Split(fraction) if *fraction != 0.0 => {
                if !(*fraction > 0.0 && *fraction < 1.0) {
                    return Err(JobError::Invalid(format!("--eval-split is the fraction of rows held out, from 0 to below 1 (got {fraction})")));
                }
                let mut order = all;
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0xE7A1));
                let held = ((fraction * data.len() as f64).ceil() as usize).min(data.len() - 1);
                if held == 0 {
                    return Err(JobError::Invalid(format!("--eval-split {fraction}: {} example(s) leave none to hold out and some to train on", data.len())));
                }
                let eval_rows = order[..held].to_vec();
                (order[held..].to_vec(), Some((data.clone(), eval_rows)))
            }
            _ => (all, None),
        };
        let packing = required(&options.packing, "packing");
        let blocks: Vec<Vec<usize>> = if packing {
            let lengths: Vec<usize> = train_rows.iter().map(|&i| data.example_len(i)).collect();
            pack_indices(&lengths, max_length, seed).into_iter().map(|block| block.into_iter().map(|j| train_rows[j]).collect()).collect()
        } else {
            train_rows.into_iter().map(|i| vec![i]).collect()
        };
        let train = Packed { data: data.clone(), blocks };
        let eval = eval.map(|(data, rows)| Packed { data, blocks: rows.into_iter().map(|i| vec![i]).collect() });

        let mut train_config = TrainConfig {
            schedule: Schedule {
                learning_rate: required(&options.learning_rate, "learning_rate"),
                scheduler: required(&options.lr_scheduler, "lr_scheduler").parse::<Scheduler>().map_err(JobError::Invalid)?,
                warmup_steps: 0,
                total_steps: 0,
                min_lr_ratio: required(&options.min_lr_ratio, "min_lr_ratio"),
            },
            adamw: AdamWConfig {
                beta1: required(&options.adam_beta1, "adam_beta1"),
                beta2: required(&options.adam_beta2, "adam_beta2"),
                epsilon: required(&options.adam_epsilon, "adam_epsilon"),
                weight_decay: required(&options.weight_decay, "weight_decay"),
            },
            max_grad_norm: Some(required(&options.max_grad_norm, "max_grad_norm")).filter(|&n| n > 0.0),
            per_device_train_batch_size: required(&options.per_device_train_batch_size, "per_device_train_batch_size").max(1),
            gradient_accumulation_steps: required(&options.gradient_accumulation_steps, "gradient_accumulation_steps").max(1),
            seed,
            compute_dtype,
            gradient_checkpointing: required(&options.gradient_checkpointing, "gradient_checkpointing"),
            activation_offloading: required(&options.activation_offloading, "activation_offloading"),
            devices: spec.devices.iter().map(|(device, _)| device.clone().autodiff()).collect(),
            shard_optimizer: required(&options.shard_optimizer, "shard_optimizer"),
        };
        if train_config.shard_optimizer && train_config.data_parallel() < 2 {
            reporter.note("note: --shard-optimizer spreads the optimizer over the devices of --devices; with one device it changes nothing");
        }
        let per_epoch = steps_per_epoch(train.len(), &train_config);
        let epochs = required(&options.num_train_epochs, "num_train_epochs");
        let total_steps = options.max_steps.unwrap_or((epochs * per_epoch as f64).ceil() as usize).max(1);
        train_config.schedule.total_steps = total_steps;
        train_config.schedule.warmup_steps = Schedule::warmup_from_ratio(required(&options.warmup_ratio, "warmup_ratio"), total_steps);

        // The plan is for the longest block this run will see.
        let longest = (0..train.len()).map(|b| train.blocks[b].iter().map(|&i| data.example_len(i)).sum::<usize>()).max().unwrap_or(0);
        let plan_options = PlanOptions {
            seq_len: longest,
            batch_size: train_config.per_device_train_batch_size,
            gradient_accumulation_steps: train_config.gradient_accumulation_steps,
            compute_dtype: compute_dtype.unwrap_or(DType::F32),
            gradient_checkpointing: train_config.gradient_checkpointing,
            activation_offloading: train_config.activation_offloading,
            lora_rank: lora.as_ref().map(|l| l.rank),
            lora_targets: lora.as_ref().map(|l| l.targets.clone()),
            runtime_bytes,
            devices: train_config.data_parallel(),
            shard_optimizer: train_config.shard_optimizer,
            base: base.storage,
            flex: crate::device::is_flex(&spec.device),
            average_share: false,
        };
        let plan = MemoryPlan::new(&config, &plan_options);
        reporter.note(&format!("memory plan at {longest} tokens × {} rows:", train_config.per_device_train_batch_size));
        for line in plan.table().lines() {
            reporter.note(&format!("  {line}"));
        }
        // Replicas on flex share the host's memory.
        let on_host = spec.devices.iter().filter(|(_, name)| name == "flex").count().max(1) as u64;
        let needed = match spec.device_name.as_str() {
            "flex" if on_host > 1 => MemoryPlan::new(&config, &PlanOptions { average_share: true, ..plan_options.clone() }).host_total(on_host),
            _ => plan.total(),
        };
        if needed != plan.total() {
            reporter.note(&format!("  {:<18} {:>9.2} GiB  {on_host} replicas on flex share the host's memory", "host total", crate::info::gib(needed)));
        }
        match crate::memory::device_memory(spec.device_memory, &spec.device_name) {
            Some(memory) if needed > memory => {
                return Err(JobError::Invalid(format!(
                    "the memory plan needs {:.2} GiB but {} has {:.2} GiB; lower --max-length or --per-device-train-batch-size, \
                     or use --gradient-checkpointing, --lora-rank or --dtype bf16 (see `distill info {} --max-length {longest}`)",
                    crate::info::gib(needed), spec.device_name, crate::info::gib(memory), spec.model.display()
                )));
            }
            Some(memory) => reporter.note(&format!("  fits the {:.2} GiB of {}", crate::info::gib(memory), spec.device_name)),
            None => reporter.note(&format!("  ({} does not report its memory to burn; give --gpu-memory to check the plan)", spec.device_name)),
        }
        if let Some(host) = crate::memory::host_memory().filter(|&host| plan.host_bytes() > host) {
            return Err(JobError::Invalid(format!(
                "the offloaded layer inputs need {:.2} GiB of host memory but {:.2} GiB is available; lower --max-length or \
                 --per-device-train-batch-size, or train without --activation-offloading",
                crate::info::gib(plan.host_bytes()),
                crate::info::gib(host)
            )));
        }

        // Everything that decides the run's trajectory; a resume must match it. Paths are
        // absolute, so `x` and `./x` are one setting and export finds the base from anywhere.
        let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let settings = serde_json::json!({
            "model": absolute(&spec.model), "data": absolute(&spec.data), "init": spec.init, "format": format!("{:?}", trace_options.format),
            "max_length": max_length, "truncate": options.truncate, "train_on_prompt": trace_options.train_on_prompt, "packing": packing,
            "seed": seed, "total_steps": total_steps, "warmup_steps": train_config.schedule.warmup_steps,
            "learning_rate": train_config.schedule.learning_rate, "scheduler": format!("{:?}", train_config.schedule.scheduler),
            "min_lr_ratio": train_config.schedule.min_lr_ratio, "adamw": format!("{:?}", train_config.adamw),
            "max_grad_norm": train_config.max_grad_norm, "batch": train_config.per_device_train_batch_size,
            "global_batch": train_config.global_batch(), "eval": spec.eval,
            "lora": lora, "compute_dtype": compute_dtype.map(|d| format!("{d:?}")), "load_in_bits": bits,
            "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings,
        });
        Ok(Job {
            spec,
            options,
            config,
            checkpoint_dir,
            tokenizer_dir,
            eos_token_ids,
            lora,
            compute_dtype,
            base,
            train,
            eval,
            train_config,
            plan,
            settings,
        })
    }

    /// The run folder.
    pub fn out(&self) -> &Path {
        &self.spec.out
    }

    /// A one-line description of what will be trained.
    pub fn describe(&self, model: &Model) -> String {
        let (trainable, total) = crate::model::lora::trainable_parameters(&model.net);
        let config = &self.train_config;
        format!(
            "training {} of {} parameters{} for {} steps ({} blocks, {} steps per epoch, {}batch {} × accumulation {}){}{}",
            crate::info::human_count(trainable as u64),
            crate::info::human_count(total as u64),
            self.lora.as_ref().map(|l| format!(" (LoRA rank {}, alpha {}, dropout {}, {}; {})", l.rank, l.alpha, l.dropout, l.targets.join(","), self.base.describe())).unwrap_or_default(),
            config.schedule.total_steps,
            self.train.len(),
            steps_per_epoch(self.train.len(), config),
            match config.data_parallel() {
                1 => String::new(),
                n => format!("{n} devices{} × ", if config.shard_optimizer { " with the optimizer sharded" } else { "" }),
            },
            config.per_device_train_batch_size,
            config.gradient_accumulation_steps,
            self.compute_dtype.map(|d| format!(", {d:?} compute over f32 {}", if self.lora.is_some() { "adapters" } else { "weights" })).unwrap_or_default(),
            crate::plan::checkpointing_phrase(config.gradient_checkpointing, config.activation_offloading),
        )
    }

    /// Trains to the end (or to an interruption, after checkpointing the step under way) and
    /// exports `out/final`. Returns the path of `metrics.jsonl`.
    pub fn run(self, reporter: &dyn Reporter, interrupted: &AtomicBool) -> Result<PathBuf, JobError> {
        let out = self.spec.out.clone();
        fs::create_dir_all(&out).map_err(io(&out))?;
        let lock_path = out.join(".lock");
        let _lock = super::lock::RunLock::acquire(&lock_path).map_err(io(&lock_path))?.ok_or_else(|| {
            JobError::Invalid(format!(
                "{} is being trained by another process (it holds {}); wait for it, or choose another --out",
                out.display(),
                lock_path.display()
            ))
        })?;
        let device = self.spec.device.clone().autodiff();
        let seed = required(&self.options.seed, "seed");
        let lora = self.lora.as_ref().map(|lora| (lora, self.base));
        let start = || base_model(&self.config, self.spec.init, self.checkpoint_dir.as_deref(), seed, lora, &device);

        let metrics_path = out.join("metrics.jsonl");
        let mut optimizer = AdamW::new(self.train_config.adamw.clone());
        let (model, start_step) = match checkpoint::latest(&out).filter(|_| self.spec.resume) {
            Some((_, dir)) => {
                // Checked before any weights are read: a mismatch is found in a second.
                let state = checkpoint::read_state(&dir)?;
                let changed = changed_settings(&state.settings, &self.settings);
                if !changed.is_empty() {
                    return Err(JobError::Invalid(format!(
                        "{}: the run was started with other settings ({}); resume it with the same command",
                        dir.display(),
                        changed.join(", ")
                    )));
                }
                // A LoRA checkpoint holds the adapters, and the frozen base is rebuilt; a full
                // checkpoint is the whole model, so the starting weights are never loaded.
                let base = self.lora.is_some().then(start).transpose()?;
                let (model, state) = checkpoint::load(&dir, &device, &mut optimizer, base)?;
                reporter.note(&format!("resuming from {} (step {})", dir.display(), state.global_step));
                (model, state.global_step)
            }
            None => (start()?, 0),
        };
        reporter.note(&self.describe(&model));
        // Metrics logged after the checkpoint (by a run that was then killed) are replayed; the
        // kept lines are written under a temporary name and renamed, so a kill here loses none.
        let kept: Vec<String> = fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|line| serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= start_step))
            .map(String::from)
            .collect();
        let partial = out.join(".metrics.jsonl.partial");
        fs::write(&partial, kept.iter().map(|line| format!("{line}\n")).collect::<String>()).map_err(io(&partial))?;
        fs::rename(&partial, &metrics_path).map_err(io(&metrics_path))?;
        let mut metrics = std::io::BufWriter::new(fs::OpenOptions::new().append(true).open(&metrics_path).map_err(io(&metrics_path))?);

        let total_steps = self.train_config.schedule.total_steps;
        let save_every = match required(&self.options.save_steps, "save_steps") {
            0 => total_steps,
            n => n,
        };
        let keep = required(&self.options.save_total_limit, "save_total_limit");
        // Five evaluations over the run unless told otherwise: enough to see the trend.
        let eval_every = match required(&self.options.eval_steps, "eval_steps") {
            0 => total_steps.div_ceil(5),
            n => n,
        }
        .max(1);
        reporter.training_started(total_steps, start_step);
        let model = train(model, &mut optimizer, &self.train, &self.train_config, start_step, |step, replicas, optimizer| -> Result<(), JobError> {
            reporter.step(step);
            writeln!(metrics, "{}", serde_json::to_string(step).expect("plain struct")).map_err(io(&metrics_path))?;
            if let Some(eval) = &self.eval
                && (step.step % eval_every == 0 || step.step == total_steps)
            {
                // A LoRA base held in the compute dtype needs its adapters cast to match; a full
                // fine-tuning run is evaluated in f32, as before data parallelism.
                let cast = self.compute_dtype.filter(|_| self.lora.is_some() && self.base.storage != BaseStorage::Full);
                let (loss, tokens) = eval_loss(&replicas.inference_model(), eval, cast);
                reporter.note(&format!("step {}: eval loss {loss:.4} ({tokens} tokens)", step.step));
                let line = serde_json::json!({"step": step.step, "eval_loss": loss, "eval_tokens": tokens});
                writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
            }
            metrics.flush().map_err(io(&metrics_path))?;
            let stop = interrupted.load(Ordering::SeqCst);
            if step.step % save_every == 0 || step.step == total_steps || stop {
                let state = TrainerState { global_step: step.step, optimizer_steps: optimizer.steps, settings: self.settings.clone() };
                checkpoint::save(&out, &replicas.checkpoint_view(), optimizer, &state, &self.tokenizer_dir, &self.eos_token_ids)?;
                if keep > 0 {
                    checkpoint::prune(&out, keep)?;
                }
            }
            if stop {
                return Err(JobError::Interrupted { step: step.step, dir: out.clone() });
            }
            Ok(())
        })?;
        reporter.training_finished();
        let final_dir = out.join("final");
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        let export_options = ExportOptions { dtype: ExportDtype::parse(self.options.export_dtype_name().map_err(JobError::Invalid)?)?, ..Default::default() };
        let model = if model.has_lora() {
            let (merged, difference) = model.merge_lora().map_err(JobError::Invalid)?;
            reporter.note(&format!("merged the LoRA adapters into the weights (logits of merged vs adapted model: max |Δ| {difference:.1e})"));
            merged
        } else {
            model
        };
        crate::export::export(&model, &self.tokenizer_dir, &self.eos_token_ids, &final_dir, &export_options)?;
        Ok(metrics_path)
    }
}

/// The keys whose values differ between two runs' settings. The number of devices is not one
/// of them: blocks are dealt to steps by the global batch (devices × batch × accumulation), so
/// a run resumes on any number of devices that keeps it (with the same per-device batch).
fn changed_settings(saved: &serde_json::Value, current: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let mut saved = saved.as_object().unwrap_or(&empty).clone();
    // Runs from before data parallelism recorded the accumulation steps of their one device.
    if let (Some(accumulation), None) = (saved.remove("accumulation"), saved.get("global_batch")) {
        let batch = saved.get("batch").and_then(|b| b.as_u64()).unwrap_or(1);
        saved.insert("global_batch".into(), (batch * accumulation.as_u64().unwrap_or(1)).into());
    }
    let (saved, current) = (&saved, current.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = saved.keys().chain(current.keys()).collect();
    keys.sort();
    keys.dedup();
    // A setting added since the run started was null (off) for it.
    let null = serde_json::Value::Null;
    keys.into_iter().filter(|k| saved.get(*k).unwrap_or(&null) != current.get(*k).unwrap_or(&null)).cloned().collect()
}

/// Mean loss over the eval rows, and the tokens it covers (forward passes only).
fn eval_loss(model: &Model, eval: &Packed, cast: Option<DType>) -> (f64, usize) {
    let model = match cast {
        Some(dtype) => model.compute_copy(dtype),
        None => model.clone(),
    };
    let (mut sum, mut count) = (0.0, 0);
    for index in 0..eval.len() {
        let block = eval.block(index);
        let batch = Batch::new(&[&block]);
        if let Some(nll) = super::nll_sum(&model, &batch, Training::default()) {
            sum += nll.into_scalar::<f32>() as f64;
            count += batch.targets.len();
        }
    }
    (sum / count.max(1) as f64, count)
}

/// The checkpoint folder and the tokenizer folder of a model argument.
fn sources(model: &Path, student: Option<&StudentConfig>) -> Result<(Option<PathBuf>, PathBuf), JobError> {
    let checkpoint_dir = match student {
        Some(student) => student.checkpoint.clone(),
        None => Some(model.to_path_buf()),
    };
    let tokenizer_dir = student
        .and_then(|s| s.tokenizer.clone())
        .or_else(|| checkpoint_dir.clone())
        .ok_or_else(|| JobError::Invalid("the student config names neither `tokenizer` nor `checkpoint`".into()))?;
    Ok((checkpoint_dir, tokenizer_dir))
}

/// The model a run starts from: pretrained or seeded random weights (f32 master weights), the
/// context settings of `config`, and LoRA adapters drawn from the seed after the base weights.
fn base_model(config: &ModelConfig, init: Init, checkpoint_dir: Option<&Path>, seed: u64, lora: Option<(&LoraConfig, Base)>, device: &Device) -> Result<Model, JobError> {
    // A LoRA base held smaller is read that way, a tensor at a time: the f32 model is never
    // in memory at once.
    let load_options = match lora.map(|(_, base)| base) {
        Some(Base { storage: BaseStorage::Quantized { bits }, dtype }) => LoadOptions { dtype, quantize_bits: Some(bits) },
        Some(Base { storage: BaseStorage::Compute, dtype }) => LoadOptions::in_dtype(dtype),
        _ => LoadOptions::default(),
    };
    let model = match init {
        Init::Random => {
            // The initial weights follow the seed, so a run (and its resume) is reproducible.
            device.seed(seed);
            Model::random(config.clone(), device)
        }
        Init::Pretrained => {
            let dir = checkpoint_dir.ok_or_else(|| JobError::Invalid("--init pretrained needs a checkpoint folder".into()))?;
            let model = Model::load(dir, device, load_options).map_err(|e| JobError::Invalid(format!("loading {}: {e}", dir.display())))?;
            // The trained parameters (the adapters) are f32 master weights whatever the base.
            let model = Model { dtype: DType::F32, ..model };
            model.with_context(config.rope_theta, config.max_position_embeddings)
        }
    };
    Ok(match lora {
        Some((lora, base)) => {
            if init == Init::Pretrained {
                device.seed(seed);
            }
            model.with_lora(lora).with_frozen_base(base.storage, base.dtype)
        }
        None => model,
    })
}

/// How a LoRA run holds its frozen base: quantized (`--load-in-4bit/8bit`), else once in the
/// compute dtype under mixed precision, else as loaded; `dtype` is what is not quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Base {
    pub storage: BaseStorage,
    pub dtype: DType,
}

impl Base {
    fn describe(&self) -> String {
        match self.storage {
            BaseStorage::Quantized { bits } => format!("base projections in {bits} bits, the rest in {:?}", self.dtype),
            BaseStorage::Compute => format!("base in {:?}", self.dtype),
            BaseStorage::Full => "base in f32".into(),
        }
    }

    fn new(bits: Option<u8>, compute_dtype: Option<DType>) -> Base {
        Base { storage: BaseStorage::choose(bits, compute_dtype.is_some()), dtype: compute_dtype.unwrap_or(DType::F32) }
    }
}

/// The model of checkpoint `dir` of a run, ready to export: a full checkpoint's own weights, or
/// a LoRA checkpoint's adapters merged into the base the run's settings name. Returns the
/// model, the tokenizer folder and the end-of-turn ids.
pub fn checkpoint_model(dir: &Path, device: &Device) -> Result<(Model, PathBuf, Vec<u32>), JobError> {
    let model_dir = dir.join("model");
    if model_dir.is_dir() {
        let pretrained = crate::pretrained::Pretrained::load(&model_dir, device, LoadOptions::default())?;
        return Ok((pretrained.model, model_dir, pretrained.eos_token_ids));
    }
    if !dir.join("adapter_model.safetensors").is_file() {
        return Err(JobError::Invalid(format!("{}: no such checkpoint (neither model/ nor adapter_model.safetensors)", dir.display())));
    }
    let state = checkpoint::read_state(dir)?;
    let setting = |key: &str| state.settings.get(key).cloned().unwrap_or(serde_json::Value::Null);
    let invalid = |what: &str| JobError::Invalid(format!("{}: trainer_state.json has no usable `{what}`", dir.display()));
    let model_path: PathBuf = serde_json::from_value(setting("model")).map_err(|_| invalid("model"))?;
    let lora: LoraConfig = serde_json::from_value(setting("lora")).map_err(|_| invalid("lora"))?;
    let seed = setting("seed").as_u64().ok_or_else(|| invalid("seed"))?;
    let init = match setting("init").as_str() {
        Some("random") => Init::Random,
        Some("pretrained") => Init::Pretrained,
        _ => return Err(invalid("init")),
    };
    let (mut config, student) = model_config_from_any(&model_path)?;
    if let Some(theta) = setting("rope_theta").as_f64() {
        config.rope_theta = theta;
    }
    if let Some(positions) = setting("max_position_embeddings").as_u64() {
        config.max_position_embeddings = positions as usize;
    }
    let (checkpoint_dir, tokenizer_dir) = sources(&model_path, student.as_ref())?;
    let eos = crate::pretrained::eos_token_ids(&tokenizer_dir, &config.eos_token_ids)?;
    let compute_dtype = setting("compute_dtype").as_str().map(|d| crate::device::dtype_named(&d.to_lowercase())).transpose().map_err(|_| invalid("compute_dtype"))?;
    let bits = setting("load_in_bits").as_u64().map(|b| b as u8);
    if let Some(dtype) = compute_dtype
        && !device.supports_dtype(dtype)
    {
        return Err(JobError::Invalid(format!(
            "{}: the run held its LoRA base in {dtype:?}, which this device cannot compute; export it on flex (the default) or a device with {dtype:?}",
            dir.display()
        )));
    }
    let base = base_model(&config, init, checkpoint_dir.as_deref(), seed, Some((&lora, Base::new(bits, compute_dtype))), device)?;
    let adapted = checkpoint::read_adapters(dir, base)?;
    let (merged, _) = adapted.merge_lora().map_err(JobError::Invalid)?;
    Ok((merged, tokenizer_dir, eos))
}
