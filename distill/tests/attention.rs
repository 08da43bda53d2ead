//! The memory-efficient attention and cross-entropy operations against the dense computations
//! they replace: outputs and gradients, for causal, packed (rows of different lengths, length
//! 1 included), padded and GQA layouts, with sequence lengths that are not multiples of the
//! block size.

mod common;

use std::sync::Arc;

use distill::burn::tensor::activation::softmax;
use distill::burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use distill::ops::attention::{Layout, Plan, attention};
use distill::ops::cross_entropy::{cross_entropy_sum, cross_entropy_sum_chunked, cross_entropy_sum_dense};

/// Dense attention with an explicit `[rows, 1, 1, seq, seq]` mask: what the model did before.
fn dense(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, layout: &Layout) -> Tensor<3> {
    let [rows, heads, seq, head_dim] = q.dims();
    let kv_heads = k.dims()[1];
    let mask: Vec<f32> = (0..rows)
        .flat_map(|r| (0..seq).flat_map(move |i| (0..seq).map(move |j| (r, i, j))))
        .map(|(r, i, j)| if layout.visible(r, i, j) { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let mask = Tensor::<5>::from_data(TensorData::new(mask, [rows, 1, 1, seq, seq]), &q.device());
    let q = q.reshape([rows, kv_heads, heads / kv_heads, seq, head_dim]);
    let scores = q.matmul(k.unsqueeze_dim::<5>(2).swap_dims(3, 4)) * (head_dim as f64).powf(-0.5) + mask;
    softmax(scores, 4)
        .matmul(v.unsqueeze_dim::<5>(2))
        .reshape([rows, heads, seq, head_dim])
        .swap_dims(1, 2)
        .reshape([rows, seq, heads * head_dim])
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec()
}

/// Largest difference relative to the largest reference value.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst.is_finite(), "non-finite values");
    worst / scale
}

struct Case {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layout: Layout,
    block: usize,
}

fn cases(device: &Device) -> Vec<Case> {
    let packed: Vec<u32> = [5usize, 1, 13, 1, 17].iter().enumerate().flat_map(|(i, &n)| vec![i as u32; n]).collect();
    // Two rows: one packed, one short row padded at the end (padding: its own segment).
    let padded = vec![
        [vec![0u32; 20], vec![1; 9], vec![2; 8]].concat(),
        [vec![0u32; 1], vec![1; 23], vec![u32::MAX; 13]].concat(),
    ];
    let mut cases = vec![
        Case { name: "causal", heads: 4, kv_heads: 4, head_dim: 8, layout: Layout::causal(2, 37), block: 16 },
        Case { name: "causal gqa", heads: 6, kv_heads: 2, head_dim: 8, layout: Layout::causal(1, 45), block: 16 },
        Case { name: "packed gqa", heads: 4, kv_heads: 2, head_dim: 8, layout: Layout::from_segments(&[packed]), block: 8 },
        Case { name: "padded batch", heads: 4, kv_heads: 1, head_dim: 16, layout: Layout::from_segments(&padded), block: 16 },
        Case { name: "one block", heads: 2, kv_heads: 1, head_dim: 4, layout: Layout::causal(1, 7), block: 64 },
    ];
    // Long enough to span several tiles of flex's fused kernel (128 queries by 512 keys), with
    // rows that start and end inside tiles. Other devices run the blocked tensor path, which the
    // cases above already span, and their dense reference at this length takes 20 s on lavapipe.
    if distill::device::is_flex(device) {
        let long: Vec<u32> = [1usize, 600, 129, 7, 600].iter().enumerate().flat_map(|(i, &n)| vec![i as u32; n]).collect();
        cases.push(Case { name: "long packed gqa", heads: 3, kv_heads: 1, head_dim: 8, layout: Layout::from_segments(&[long]), block: 64 });
    }
    cases
}

fn check(device: &Device, tolerance: f32, name: &str) {
    for case in cases(device) {
        let (rows, seq) = (case.layout.rows(), case.layout.len());
        device.seed(7);
        let random = |heads: usize| Tensor::<4>::random([rows, heads, seq, case.head_dim], Distribution::Normal(0.0, 1.0), device);
        let (q, k, v) = (random(case.heads), random(case.kv_heads), random(case.kv_heads));
        let upstream = Tensor::<3>::random([rows, seq, case.heads * case.head_dim], Distribution::Normal(0.0, 1.0), device);
        let plan = Arc::new(Plan::with_block(case.layout.clone(), case.block, device));

        let run = |efficient: bool| {
            let autodiff = device.clone().autodiff();
            let leaf = |t: &Tensor<4>| Tensor::<4>::from_data(t.clone().into_data(), &autodiff).require_grad();
            let (q, k, v) = (leaf(&q), leaf(&k), leaf(&v));
            let output = if efficient {
                attention(q.clone(), k.clone(), v.clone(), &plan)
            } else {
                dense(q.clone(), k.clone(), v.clone(), &case.layout)
            };
            let upstream = Tensor::<3>::from_data(upstream.clone().into_data(), &autodiff);
            let grads = (output.clone() * upstream).sum().backward();
            let grad = |t: &Tensor<4>| values(t.grad(&grads).expect("a gradient"));
            (output.into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec(), grad(&q), grad(&k), grad(&v))
        };
        let (want, want_dq, want_dk, want_dv) = run(false);
        let (got, dq, dk, dv) = run(true);
        for (what, got, want) in [("output", &got, &want), ("dQ", &dq, &want_dq), ("dK", &dk, &want_dk), ("dV", &dv, &want_dv)] {
            let error = relative_error(got, want);
            println!("{name} {}: {what} relative error {error:.2e}", case.name);
            assert!(error <= tolerance, "{name} {}: {what} differs by {error:e} (tolerance {tolerance:e})", case.name);
        }
    }
}

#[test]
fn attention_matches_dense_attention_on_flex() {
    check(&distill::device::parse("flex").unwrap(), 1e-5, "flex");
}

#[test]
fn attention_matches_dense_attention_on_wgpu() {
    if std::env::var("DISTILL_TEST_SKIP_WGPU").is_ok() {
        return;
    }
    check(&distill::device::parse("wgpu").unwrap(), 1e-4, "wgpu");
}

/// The devices `DISTILL_TEST_DEVICES` names (a GPU machine's `vulkan`, `cuda`, …): the same
/// cases at wgpu's tolerance, and bf16 where the device computes it.
#[test]
fn attention_matches_dense_attention_on_the_devices_named() {
    for (name, device) in common::extra_devices() {
        check(&device, 1e-4, &name);
        if device.supports_dtype(DType::BF16) {
            bf16_follows_f32(&device, &name);
        } else {
            println!("{name}: no bf16 compute, bf16 case not run");
        }
    }
}

/// bf16 compute keeps f32 statistics; it follows the f32 dense result to bf16's precision.
#[test]
fn attention_in_bf16_follows_f32() {
    bf16_follows_f32(&distill::device::parse("flex").unwrap(), "flex");
}

fn bf16_follows_f32(device: &Device, name: &str) {
    let layout = Layout::from_segments(&[[vec![0u32; 30], vec![1; 1], vec![2; 19]].concat()]);
    device.seed(3);
    let random = |heads: usize| Tensor::<4>::random([1, heads, 50, 16], Distribution::Normal(0.0, 1.0), device);
    let (q, k, v) = (random(4), random(2), random(2));
    let want = dense(q.clone(), k.clone(), v.clone(), &layout).into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec();
    let plan = Arc::new(Plan::with_block(layout, 16, device));
    let bf16 = |t: Tensor<4>| t.cast(DType::BF16);
    let got = attention(bf16(q), bf16(k), bf16(v), &plan);
    assert_eq!(got.dtype(), DType::BF16);
    let error = relative_error(&got.into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec(), &want);
    println!("{name} bf16: output relative error {error:.2e} against f32");
    assert!(error < 2e-2, "{name}: bf16 attention differs from f32 by {error:e}");
}

/// Packed short rows cost what they cost alone: no query block scores keys of another row.
#[test]
fn packed_rows_skip_the_keys_they_cannot_see() {
    let device = distill::device::parse("flex").unwrap();
    let rows: Vec<u32> = (0..64u32).flat_map(|i| vec![i; 64]).collect();
    let plan = Plan::with_block(Layout::from_segments(&[rows]), 64, &device);
    // 64 rows of 64 tokens in blocks of 64: each block scores only its own row's 64 × 64.
    assert_eq!(plan.scored_pairs(), 64 * 64 * 64);
    let long = Plan::with_block(Layout::causal(1, 4096), 64, &device);
    assert_eq!(long.scored_pairs(), (1..=64).map(|b| 64 * 64 * b).sum::<usize>());
}

#[test]
fn chunked_cross_entropy_equals_the_dense_loss_and_gradients() {
    let device = distill::device::parse("flex").unwrap();
    device.seed(11);
    // 1500 splits into equal groups for the two-level sum; a prime vocabulary is padded.
    for vocab in [1500, 1499] {
        chunked_loss_case(&device, vocab);
    }
}

fn chunked_loss_case(device: &Device, vocab: usize) {
    let (rows, width) = (37, 24);
    let hidden = Tensor::<2>::random([rows, width], Distribution::Normal(0.0, 1.0), device);
    let weight = Tensor::<2>::random([vocab, width], Distribution::Normal(0.0, 0.5), device);
    let targets: Vec<u32> = (0..rows).map(|i| (i * 389 % vocab) as u32).collect();
    let run = |chunk: Option<usize>| {
        let autodiff = device.clone().autodiff();
        let h = Tensor::<2>::from_data(hidden.clone().into_data(), &autodiff).require_grad();
        let w = Tensor::<2>::from_data(weight.clone().into_data(), &autodiff).require_grad();
        let loss = match chunk {
            Some(chunk) => cross_entropy_sum_chunked(h.clone(), w.clone(), &targets, chunk),
            None => cross_entropy_sum_dense(h.clone(), w.clone(), &targets),
        };
        // A loss gradient other than 1, as the mean over a step's tokens gives.
        let grads = (loss.clone() * 0.37).backward();
        let grad = |t: &Tensor<2>| t.grad(&grads).unwrap().into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec();
        (loss.into_scalar::<f32>(), grad(&h), grad(&w))
    };
    let (want, want_dh, want_dw) = run(None);
    for chunk in [5, 16, 37, 64] {
        let (got, dh, dw) = run(Some(chunk));
        assert!((got - want).abs() / want.abs() < 1e-6, "vocab {vocab}, chunk {chunk}: loss {got} vs {want}");
        assert!(relative_error(&dh, &want_dh) < 1e-5, "chunk {chunk}: hidden gradient {:e}", relative_error(&dh, &want_dh));
        assert!(relative_error(&dw, &want_dw) < 1e-5, "chunk {chunk}: weight gradient {:e}", relative_error(&dw, &want_dw));
    }
    // Off the autodiff graph (evaluation) the same loss comes out.
    let plain = cross_entropy_sum(hidden, weight, &targets).into_scalar::<f32>();
    assert!((plain - want).abs() / want.abs() < 1e-6);
}

/// `distill bench attention` times both passes per length and pairs them with the reference
/// command's JSON (here a stand-in that prints fixed times), refusing a reply of another length.
#[test]
fn bench_attention_prints_both_passes_beside_the_reference() {
    let bench = |reference: &str, lengths: &str| {
        common::distill(&[
            "bench", "attention", "--device", "flex", "--config", "student_configs/tiny-qwen2.toml", "--seq-len", lengths, "--repeats", "1",
            "--reference", reference,
        ])
    };
    let output = bench(r#"echo '{"forward_s": [0.5, 0.5], "backward_s": [1.0, 1.0]}'; true"#, "40,70");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}", common::stderr(&output));
    for seq in ["40", "70"] {
        for side in ["burn", "pytorch", "ratio"] {
            assert!(stdout.lines().any(|l| l.starts_with(side) && l.contains(&format!("seq {seq:>6}"))), "{side} at {seq} in {stdout}");
        }
    }
    let short = bench(r#"echo '{"forward_s": [0.5], "backward_s": [1.0]}'; true"#, "40,70");
    assert!(!short.status.success() && common::stderr(&short).contains("has 1 entries for 2 lengths"), "{}", common::stderr(&short));
    let zero = bench("true", "0");
    assert!(!zero.status.success() && common::stderr(&zero).contains("--seq-len takes positive lengths"), "{}", common::stderr(&zero));
}
