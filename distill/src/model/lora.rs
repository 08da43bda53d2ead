//! LoRA (Hu et al. 2021) as PEFT does it: a frozen base weight `W` and a trainable low-rank
//! update, `y = x W + dropout(x) A B · alpha / r`, on the projections named in `targets`.
//!
//! burn 0.22 has a LoRA reparameterizer (`Module::apply_lora`), but it rebuilds the full
//! `in × out` weight on every forward pass (a weight-sized activation per layer, which undoes
//! much of LoRA's memory saving) and has no adapter dropout, which PEFT users set
//! (`lora_dropout`). The update here goes through `x A B` and never forms `A B`, except when it
//! is merged into `W` for export.

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor};

use super::linear::Linear;
use super::transformer::CausalLm;

/// The projections LoRA can adapt, by their HF / PEFT names.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// A subset of [`TARGETS`].
    pub targets: Vec<String>,
}

impl LoraConfig {
    /// Parses `--lora-targets`: a comma-separated list of [`TARGETS`], or `all-linear` (PEFT's
    /// name for every one of them).
    pub fn parse_targets(text: &str) -> Result<Vec<String>, String> {
        if text.trim() == "all-linear" {
            return Ok(TARGETS.iter().map(|t| t.to_string()).collect());
        }
        let mut targets = Vec::new();
        for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !TARGETS.contains(&name) {
                return Err(format!("unknown LoRA target `{name}`; choose from {} or all-linear", TARGETS.join(", ")));
            }
            if !targets.iter().any(|t| t == name) {
                targets.push(name.to_string());
            }
        }
        if targets.is_empty() {
            return Err("--lora-targets names no projection".into());
        }
        Ok(targets)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("--lora-rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("--lora-dropout must be in [0, 1) (got {})", self.dropout));
        }
        Ok(())
    }

    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The low-rank update of one projection. Factors are stored as PEFT stores them:
/// `lora_a` is `[rank, in]`, `lora_b` is `[out, rank]`.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub lora_a: Param<Tensor<2>>,
    pub lora_b: Param<Tensor<2>>,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f64,
    pub scaling: f64,
}

impl LoraLinear {
    /// PEFT's initialisation: `A` Kaiming-uniform (bound `1/sqrt(in)`), `B` zero, so the adapted
    /// model starts as the base model.
    pub fn init(d_input: usize, d_output: usize, config: &LoraConfig, device: &Device) -> Self {
        let bound = 1.0 / (d_input as f64).sqrt();
        let lora_a = Tensor::<2>::random([config.rank, d_input], Distribution::Uniform(-bound, bound), device);
        let lora_b = Tensor::<2>::zeros([d_output, config.rank], device);
        LoraLinear {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            dropout: config.dropout,
            scaling: config.scaling(),
        }
    }

    /// `base(x) + dropout(x) Aᵀ Bᵀ · scaling`, with dropout only while `training`. The mask comes
    /// from the device's generator, which the decoder layer seeds, so a recomputation (layer
    /// checkpointing) draws the same mask.
    pub fn forward(&self, base: &Linear, x: Tensor<3>, training: bool) -> Tensor<3> {
        let input = if training && self.dropout > 0.0 {
            let keep = 1.0 - self.dropout;
            let mask = x.random_like(Distribution::Bernoulli(keep));
            x.clone() * mask * (1.0 / keep)
        } else {
            x.clone()
        };
        let update = input
            .matmul(self.lora_a.val().transpose().unsqueeze())
            .matmul(self.lora_b.val().transpose().unsqueeze());
        base.forward(x) + update * self.scaling
    }

    /// `base` with the update folded in (burn keeps weights as `[in, out]`).
    pub fn merge(&self, base: Linear) -> Linear {
        let delta = self.lora_a.val().transpose().matmul(self.lora_b.val().transpose()) * self.scaling;
        // A quantized or bf16 base is merged in the adapters' f32, as its values dequantize.
        let base = base.dequantized();
        let weight = base.weight.expect("dequantized is dense").map(|w| {
            let w = if w.dtype() == delta.dtype() { w } else { w.cast(delta.dtype()) };
            (w + delta.clone()).detach()
        });
        Linear::dense(weight, base.bias)
    }
}

/// A projection's adapter when it has one (`training`: with adapter dropout).
pub fn project(base: &Linear, lora: Option<&LoraLinear>, x: Tensor<3>, training: bool) -> Tensor<3> {
    match lora {
        Some(lora) => lora.forward(base, x, training),
        None => base.forward(x),
    }
}

#[derive(Module, Debug)]
pub struct AttentionLora {
    pub q_proj: Option<LoraLinear>,
    pub k_proj: Option<LoraLinear>,
    pub v_proj: Option<LoraLinear>,
    pub o_proj: Option<LoraLinear>,
}

#[derive(Module, Debug)]
pub struct MlpLora {
    pub gate_proj: Option<LoraLinear>,
    pub up_proj: Option<LoraLinear>,
    pub down_proj: Option<LoraLinear>,
}

/// Freezes every weight of `net` and attaches fresh adapters to the targeted projections.
pub fn attach(net: CausalLm, config: &LoraConfig, device: &Device) -> CausalLm {
    let mut net = net.no_grad();
    let wants = |name: &str| config.targets.iter().any(|t| t == name);
    let adapter = |name: &str, base: &Linear| {
        wants(name).then(|| {
            let [d_input, d_output] = base.dims();
            LoraLinear::init(d_input, d_output, config, device)
        })
    };
    for layer in &mut net.layers {
        let attention = &layer.self_attn;
        layer.self_attn.lora = Some(AttentionLora {
            q_proj: adapter("q_proj", &attention.q_proj),
            k_proj: adapter("k_proj", &attention.k_proj),
            v_proj: adapter("v_proj", &attention.v_proj),
            o_proj: adapter("o_proj", &attention.o_proj),
        });
        let mlp = &layer.mlp;
        layer.mlp.lora = Some(MlpLora {
            gate_proj: adapter("gate_proj", &mlp.gate_proj),
            up_proj: adapter("up_proj", &mlp.up_proj),
            down_proj: adapter("down_proj", &mlp.down_proj),
        });
    }
    net
}

/// Folds every adapter into its base weight and removes the adapters: a plain model, as
/// transformers and vLLM load it.
pub fn merge(mut net: CausalLm) -> CausalLm {
    fn fold(base: Linear, lora: Option<LoraLinear>) -> Linear {
        match lora {
            Some(lora) => lora.merge(base),
            None => base,
        }
    }
    net.layers = net
        .layers
        .into_iter()
        .map(|mut layer| {
            if let Some(lora) = layer.self_attn.lora.take() {
                let a = &mut layer.self_attn;
                a.q_proj = fold(a.q_proj.clone(), lora.q_proj);
                a.k_proj = fold(a.k_proj.clone(), lora.k_proj);
                a.v_proj = fold(a.v_proj.clone(), lora.v_proj);
                a.o_proj = fold(a.o_proj.clone(), lora.o_proj);
            }
            if let Some(lora) = layer.mlp.lora.take() {
                let m = &mut layer.mlp;
                m.gate_proj = fold(m.gate_proj.clone(), lora.gate_proj);
                m.up_proj = fold(m.up_proj.clone(), lora.up_proj);
                m.down_proj = fold(m.down_proj.clone(), lora.down_proj);
            }
            layer
        })
        .collect();
    net
}

/// Every adapter of `net` under its PEFT name prefix
/// (`base_model.model.model.layers.N.self_attn.q_proj`).
fn adapters_mut(net: &mut CausalLm) -> Vec<(String, &mut LoraLinear)> {
    let mut adapters = Vec::new();
    for (index, layer) in net.layers.iter_mut().enumerate() {
        let prefix = |module: &str, name: &str| format!("base_model.model.model.layers.{index}.{module}.{name}");
        if let Some(l) = &mut layer.self_attn.lora {
            for (name, lora) in [("q_proj", &mut l.q_proj), ("k_proj", &mut l.k_proj), ("v_proj", &mut l.v_proj), ("o_proj", &mut l.o_proj)] {
                if let Some(lora) = lora {
                    adapters.push((prefix("self_attn", name), lora));
                }
            }
        }
        if let Some(l) = &mut layer.mlp.lora {
            for (name, lora) in [("gate_proj", &mut l.gate_proj), ("up_proj", &mut l.up_proj), ("down_proj", &mut l.down_proj)] {
                if let Some(lora) = lora {
                    adapters.push((prefix("mlp", name), lora));
                }
            }
        }
    }
    adapters
}

/// The adapters' factors under PEFT's names (`….q_proj.lora_A.weight` `[rank, in]`,
/// `….lora_B.weight` `[out, rank]`), for `adapter_model.safetensors`.
pub fn adapter_tensors(net: &CausalLm) -> Vec<(String, Tensor<2>)> {
    let mut copy = net.clone();
    adapters_mut(&mut copy)
        .into_iter()
        .flat_map(|(prefix, lora)| {
            [(format!("{prefix}.lora_A.weight"), lora.lora_a.val()), (format!("{prefix}.lora_B.weight"), lora.lora_b.val())]
        })
        .collect()
}

/// Replaces the factors of every adapter of `net` with the tensors `load` gives for their PEFT
/// names (see [`adapter_tensors`]); an error names the first one missing or misshapen.
pub fn load_adapter_tensors(
    mut net: CausalLm,
    mut load: impl FnMut(&str, [usize; 2]) -> Result<Tensor<2>, String>,
) -> Result<CausalLm, String> {
    for (prefix, lora) in adapters_mut(&mut net) {
        let a = load(&format!("{prefix}.lora_A.weight"), lora.lora_a.dims())?;
        let b = load(&format!("{prefix}.lora_B.weight"), lora.lora_b.dims())?;
        lora.lora_a = Param::from_tensor(a);
        lora.lora_b = Param::from_tensor(b);
    }
    Ok(net)
}

/// Trainable and total parameter counts of `net` (LoRA reports both, as PEFT does).
pub fn trainable_parameters(net: &CausalLm) -> (usize, usize) {
    struct Count(usize, usize);
    impl burn::module::ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n: usize = param.shape().num_elements();
            self.1 += n;
            if param.val().is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut count = Count(0, 0);
    net.visit(&mut count);
    (count.0, count.1)
}
