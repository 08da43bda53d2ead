//! `distill bench`: forward, generation and training speed (and memory) beside the PyTorch
//! reference, on the same cores in the same run.

use anyhow::{Context, Result, bail};

use distill::benchmark::run_reference;
use distill::burn::tensor::DType;
use distill::info::{gib, human_count};
use distill::student::model_config_from_any;

use crate::args::{BenchAttentionArgs, BenchForwardArgs, BenchGenerateArgs, BenchTrainArgs};

pub fn bench_train(args: BenchTrainArgs) -> Result<()> {
    use distill::benchmark::{BurnSide, compare_training};
    if args.reference.is_some() && args.lora_rank.is_some() {
        bail!("--reference measures full fine-tuning in PyTorch; compare LoRA runs without it (or drop --lora-rank)");
    }
    let (config, _) = model_config_from_any(&args.config)?;
    let compute_dtype = args.bf16.then_some(DType::BF16);
    if !args.devices.is_empty() {
        return bench_data_parallel(&args, &config, compute_dtype);
    }
    let (device, device_name) = distill::device::select(args.device.as_deref())?;
    if args.bf16 {
        distill::device::dtype("bf16", &device, &device_name)?;
    }
    // The bench builds its model in f32 (random weights), whatever the base is stored in then.
    distill::train::job::check_tensor_limit(&config, &device_name, DType::F32)?;
    if !args.json {
        println!(
            "model: {} parameters, {} row(s), {} timed step(s) per length after {} warm-up, {}{}{}",
            human_count(config.num_parameters()), args.per_device_train_batch_size, args.steps, args.warmup_steps,
            if args.bf16 { "bf16 compute over f32 weights" } else { "f32" },
            distill::plan::checkpointing_phrase(args.gradient_checkpointing, args.activation_offloading),
            args.lora_rank.map(|r| format!(", LoRA rank {r}")).unwrap_or_default(),
        );
    }
    let available = distill::memory::device_memory(None, &device_name);
    for &seq_len in &args.seq_len {
        let bench = train_bench(&args, seq_len, compute_dtype, Vec::new());
        let compared = compare_training(&config, &args.config, &bench, args.reference.as_deref(), &device, available);
        let measured = match compared.burn {
            BurnSide::Skipped { plan_bytes, available_bytes } => {
                println!("burn     seq {seq_len:>6}   skipped: the memory plan needs {:.2} GiB, {device_name} has {:.2} GiB", gib(plan_bytes), gib(available_bytes));
                None
            }
            BurnSide::Measured(measured) if args.json => {
                println!("{}", serde_json::to_string(&measured)?);
                Some(measured)
            }
            BurnSide::Measured(measured) => {
                let versus = |peak: u64| 100.0 * (measured.plan_bytes as f64 / peak as f64 - 1.0);
                // The heap's own peak leaves out what the allocator keeps after frees (on flex,
                // where the heap is the device's memory).
                let heap = measured
                    .peak_allocated_bytes
                    .filter(|_| distill::device::is_flex(&device))
                    .map(|heap| format!("; heap peak {:.2} GiB, plan {:+.0}%", gib(heap), versus(heap)))
                    .unwrap_or_default();
                let mfu = args.peak_tflops.map(|peak| format!(", MFU {:.1}%", 100.0 * measured.model_tflops / peak)).unwrap_or_default();
                println!(
                    "burn     seq {seq_len:>6}   {:>9.1} tokens/s   peak memory {:>6.2} GiB   (plan {:.2} GiB, {:+.0}%{heap})   model {:.2} TFLOP/s{mfu}",
                    measured.tokens_per_s, gib(measured.peak_memory_bytes), gib(measured.plan_bytes), versus(measured.peak_memory_bytes), measured.model_tflops,
                );
                Some(measured)
            }
        };
        let reference = match compared.reference {
            None => continue,
            Some(Ok(reference)) => reference,
            Some(Err(why)) => {
                println!("pytorch  seq {seq_len:>6}   failed: {why}");
                continue;
            }
        };
        if args.json {
            println!("{}", serde_json::json!({"reference": "pytorch", "seq_len": seq_len, "tokens_per_s": reference.tokens_per_s, "peak_memory_bytes": reference.peak_memory_bytes}));
            continue;
        }
        let reference_tflops = reference.tokens_per_s * distill::benchmark::training_flops_per_token(&config, seq_len, false) / 1e12;
        let mfu = args.peak_tflops.map(|peak| format!(", MFU {:.1}%", 100.0 * reference_tflops / peak)).unwrap_or_default();
        println!(
            "pytorch  seq {seq_len:>6}   {:>9.1} tokens/s   peak memory {:>6.2} GiB   model {reference_tflops:.2} TFLOP/s{mfu}",
            reference.tokens_per_s,
            gib(reference.peak_memory_bytes as u64)
        );
        if let Some(measured) = measured {
            println!(
                "ratio    seq {seq_len:>6}   {:>9.2}× speed   {:>6.2}× memory   (burn / pytorch; speed > 1 and memory < 1 are better)",
                measured.tokens_per_s / reference.tokens_per_s, measured.peak_memory_bytes as f64 / reference.peak_memory_bytes
            );
        }
    }
    Ok(())
}

/// The steps `bench train` measures at `seq_len` on `devices` (empty: the measured device alone).
fn train_bench(args: &BenchTrainArgs, seq_len: usize, compute_dtype: Option<DType>, devices: Vec<distill::burn::tensor::Device>) -> distill::benchmark::TrainBench {
    distill::benchmark::TrainBench {
        seq_len,
        batch_size: args.per_device_train_batch_size,
        warmup_steps: args.warmup_steps,
        steps: args.steps.max(1),
        compute_dtype,
        gradient_checkpointing: args.gradient_checkpointing,
        activation_offloading: args.activation_offloading,
        lora_rank: args.lora_rank,
        shard_optimizer: args.shard_optimizer && !devices.is_empty(),
        devices,
        load_in_bits: if args.load_in_4bit { Some(4) } else if args.load_in_8bit { Some(8) } else { None },
    }
}

/// `bench train --devices`: tokens/s on the first device alone and on all of them, the same
/// per-device batch, and the scaling efficiency (n-device tokens/s over n × one device's).
fn bench_data_parallel(args: &BenchTrainArgs, config: &distill::model::ModelConfig, compute_dtype: Option<DType>) -> Result<()> {
    use distill::benchmark::measure_training;
    let devices = args.devices.iter().map(|name| distill::device::parse(name)).collect::<Result<Vec<_>, _>>()?;
    let n = devices.len();
    println!(
        "model: {} parameters, {} row(s) per device, {} timed step(s) after {} warm-up; 1 device ({}) vs {n} ({}){}",
        human_count(config.num_parameters()), args.per_device_train_batch_size, args.steps, args.warmup_steps,
        args.devices[0], args.devices.join(","), if args.shard_optimizer { ", optimizer sharded" } else { "" },
    );
    for &seq_len in &args.seq_len {
        let one = measure_training(config, &train_bench(args, seq_len, compute_dtype, Vec::new()), &devices[0]);
        let all = measure_training(config, &train_bench(args, seq_len, compute_dtype, devices.clone()), &devices[0]);
        let efficiency = all.tokens_per_s / (n as f64 * one.tokens_per_s);
        if args.json {
            println!("{}", serde_json::json!({"seq_len": seq_len, "devices": n, "one_device_tokens_per_s": one.tokens_per_s, "tokens_per_s": all.tokens_per_s, "scaling_efficiency": efficiency}));
            continue;
        }
        println!("1 device  seq {seq_len:>6}   {:>9.1} tokens/s", one.tokens_per_s);
        println!("{n} devices seq {seq_len:>6}   {:>9.1} tokens/s   speed-up {:.2}×   scaling efficiency {:.0}%", all.tokens_per_s, all.tokens_per_s / one.tokens_per_s, 100.0 * efficiency);
    }
    Ok(())
}

/// The prompts of `bench generate`; `distill/benches/reference_generate.py` builds the same.
fn bench_prompts(batch_size: usize, prompt_len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch_size)
        .map(|row| {
            let len = (prompt_len / 2 + row * prompt_len.div_ceil(2) / batch_size.max(1)).max(1);
            (0..len).map(|i| ((row * 131 + i) * 7919 % vocab) as u32).collect()
        })
        .collect()
}

pub fn bench_generate(args: BenchGenerateArgs) -> Result<()> {
    use distill::generate::{BatchGenerator, SamplingParams, generate};
    let (device, options) = args.device.resolve()?;
    let (config, _) = model_config_from_any(&args.config)?;
    let model = distill::model::Model::random(config.clone(), &device).with_dtype(options.dtype);
    let prompts = bench_prompts(args.batch_size, args.prompt_len, config.vocab_size);
    println!("model: {} parameters, {} sequences, prompts of {}-{} tokens, {} new tokens each, dtype {:?}",
        human_count(config.num_parameters()), prompts.len(), prompts[0].len(), prompts[prompts.len() - 1].len(), args.new_tokens, options.dtype);
    // Greedy with no end-of-sequence token: every sequence generates exactly `new_tokens`.
    let params = SamplingParams { max_new_tokens: args.new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 };
    let total = (prompts.len() * args.new_tokens) as f64;
    generate(&model, &prompts[0], &SamplingParams { max_new_tokens: 2, ..params.clone() }, &[], |_| {});

    let started = std::time::Instant::now();
    for prompt in &prompts {
        generate(&model, prompt, &params, &[], |_| {});
    }
    let alone = total / started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let mut batch = BatchGenerator::new(&[], prompts.len());
    for (id, prompt) in prompts.iter().enumerate() {
        batch.add(id as u64, prompt.clone(), params.clone());
    }
    while !batch.is_empty() {
        batch.step(&model, |_, _| {});
    }
    let batched = total / started.elapsed().as_secs_f64();
    println!("burn one at a time  {alone:>10.1} tokens/s");
    println!("burn batched        {batched:>10.1} tokens/s   {:.2}× one at a time", batched / alone);
    if let Some(command) = &args.reference {
        let reference = run_reference(&format!(
            "{command} --config {} --batch-size {} --prompt-len {} --new-tokens {}",
            args.config.display(), args.batch_size, args.prompt_len, args.new_tokens
        ))?;
        let rate = reference.get("tokens_per_s").and_then(|v| v.as_f64()).context("reference JSON lacks tokens_per_s")?;
        println!("pytorch batched     {rate:>10.1} tokens/s   burn batched / pytorch batched: {:.2}× (> 1 is faster)", batched / rate);
    }
    Ok(())
}

pub fn bench_forward(args: BenchForwardArgs) -> Result<()> {
    let (device, options) = args.device.resolve()?;
    let (config, _) = model_config_from_any(&args.config)?;
    println!("model: {} parameters, prompt {} tokens, decode {} tokens, dtype {:?}",
        human_count(config.num_parameters()), args.prompt_len, args.decode_tokens, options.dtype);
    let model = distill::model::Model::random(config.clone(), &device).with_dtype(options.dtype);
    let prompt: Vec<u32> = (0..args.prompt_len).map(|i| (i * 7919 % config.vocab_size) as u32).collect();
    let mut prefill_times = Vec::new();
    let mut decode_times = Vec::new();
    for repeat in 0..=args.repeats {
        let mut cache = model.new_cache();
        let started = std::time::Instant::now();
        let logits = model.step(&prompt, &mut cache);
        let mut token = distill::generate::argmax(logits.into_data().convert::<f32>().as_slice::<f32>().expect("f32"));
        let prefill = started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        for _ in 0..args.decode_tokens {
            let logits = model.step(&[token], &mut cache);
            token = distill::generate::argmax(logits.into_data().convert::<f32>().as_slice::<f32>().expect("f32"));
        }
        let decode = started.elapsed().as_secs_f64();
        if repeat > 0 {
            prefill_times.push(prefill);
            decode_times.push(decode);
        }
    }
    let prefill_rate = args.prompt_len as f64 / median(prefill_times);
    let decode_rate = args.decode_tokens as f64 / median(decode_times);
    println!("burn     prefill {prefill_rate:>10.1} tokens/s   decode {decode_rate:>8.1} tokens/s");
    if let Some(command) = &args.reference {
        let reference = run_reference(&format!(
            "{command} --config {} --prompt-len {} --decode-tokens {} --repeats {}",
            args.config.display(), args.prompt_len, args.decode_tokens, args.repeats
        ))?;
        let rate = |key: &str| reference.get(key).and_then(|v| v.as_f64()).with_context(|| format!("reference JSON lacks {key}"));
        let (reference_prefill, reference_decode) = (rate("prefill_tokens_per_s")?, rate("decode_tokens_per_s")?);
        println!("pytorch  prefill {reference_prefill:>10.1} tokens/s   decode {reference_decode:>8.1} tokens/s");
        println!("ratio    prefill {:>10.2}×           decode {:>8.2}×   (burn / pytorch; > 1 is faster)",
            prefill_rate / reference_prefill, decode_rate / reference_decode);
    }
    Ok(())
}

/// Forward and backward seconds of the attention operation on random q, k, v: the median of
/// `repeats` after a warm-up (the higher middle value of an even count, as the reference takes
/// it). Each pass ends by reading a value back, so that asynchronous devices are timed to the
/// end of their work.
pub fn bench_attention(args: BenchAttentionArgs) -> Result<()> {
    use std::sync::Arc;
    use std::time::Instant;

    use distill::burn::tensor::{Distribution, Tensor};
    use distill::ops::attention::{Layout, Plan, attention};

    let (device, options) = args.device.resolve()?;
    let (config, _) = model_config_from_any(&args.config)?;
    let (heads, kv_heads, d) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim);
    if args.seq_len.is_empty() || args.seq_len.contains(&0) || args.repeats == 0 {
        bail!("--seq-len takes positive lengths and --repeats at least 1");
    }
    println!("attention: {heads} heads, {kv_heads} KV heads, head_dim {d}, causal, one row, {:?}; median of {} after one warm-up", options.dtype, args.repeats);
    let autodiff = device.clone().autodiff();
    // A causal pass multiplies q kᵀ and P v over the lower triangle: 2 products of 2·d FLOPs a
    // pair; the backward pass makes 5 (FlashAttention-2's count).
    let forward_flops = |seq: usize| 2.0 * 2.0 * (seq as f64 * (seq as f64 + 1.0) / 2.0) * d as f64 * heads as f64;
    let mut measured = Vec::new();
    for &seq in &args.seq_len {
        let plan = Arc::new(Plan::new(Layout::causal(1, seq), heads, &autodiff));
        let (mut forward, mut backward) = (Vec::new(), Vec::new());
        for repeat in 0..=args.repeats {
            let random = |h: usize| Tensor::<4>::random([1, h, seq, d], Distribution::Normal(0.0, 1.0), &autodiff).cast(options.dtype).require_grad();
            let (q, k, v) = (random(heads), random(kv_heads), random(kv_heads));
            let upstream = Tensor::<3>::random([1, seq, heads * d], Distribution::Normal(0.0, 1.0), &autodiff).cast(options.dtype);
            let _ = upstream.clone().sum().into_scalar::<f32>();
            let started = Instant::now();
            let output = attention(q.clone(), k.clone(), v.clone(), &plan);
            let _ = output.clone().sum().into_scalar::<f32>();
            let forward_s = started.elapsed().as_secs_f64();
            let started = Instant::now();
            let grads = (output * upstream).sum().backward();
            for input in [&q, &k, &v] {
                let _ = input.grad(&grads).context("a gradient of the attention's input")?.sum().into_scalar::<f32>();
            }
            if repeat > 0 {
                forward.push(forward_s);
                backward.push(started.elapsed().as_secs_f64());
            }
        }
        let (forward, backward) = (median(forward), median(backward));
        let flops = forward_flops(seq);
        println!("burn     seq {seq:>6}   forward {forward:>8.3} s {:>6.0} GFLOP/s   backward {backward:>8.3} s {:>6.0} GFLOP/s",
            flops / forward / 1e9, 2.5 * flops / backward / 1e9);
        measured.push((seq, forward, backward));
    }
    if let Some(command) = &args.reference {
        let dtype = match options.dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            other => bail!("--reference compares f32 or bf16, not {other:?}"),
        };
        let lengths: Vec<String> = args.seq_len.iter().map(usize::to_string).collect();
        let reference = run_reference(&format!(
            "{command} --heads {heads} --kv-heads {kv_heads} --head-dim {d} --seq-len {} --repeats {} --dtype {dtype}",
            lengths.join(","), args.repeats
        ))?;
        let times = |key: &str| -> Result<Vec<f64>> {
            let values = reference.get(key).and_then(|v| v.as_array()).with_context(|| format!("reference JSON lacks {key}"))?;
            let values: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
            if values.len() != measured.len() {
                bail!("reference JSON's {key} has {} entries for {} lengths", values.len(), measured.len());
            }
            Ok(values)
        };
        let (reference_forward, reference_backward) = (times("forward_s")?, times("backward_s")?);
        for (i, &(seq, forward, backward)) in measured.iter().enumerate() {
            let flops = forward_flops(seq);
            let (f, b) = (reference_forward[i], reference_backward[i]);
            println!("pytorch  seq {seq:>6}   forward {f:>8.3} s {:>6.0} GFLOP/s   backward {b:>8.3} s {:>6.0} GFLOP/s", flops / f / 1e9, 2.5 * flops / b / 1e9);
            println!("ratio    seq {seq:>6}   forward {:>8.2}×                backward {:>8.2}×   (burn / pytorch speed; > 1 is faster)", f / forward, b / backward);
        }
    }
    Ok(())
}

/// The middle value of timings (the higher of the two middle ones for an even count).
fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

