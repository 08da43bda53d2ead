//! AdamW with PyTorch's semantics, and global gradient-norm clipping.
//!
//! burn's own AdamW differs from `torch.optim.AdamW` in its defaults (eps 1e-5, weight decay
//! 1e-4) and applies decay to every parameter, and its clipping is per tensor; distillation
//! recipes are tuned for PyTorch's behaviour (`max_grad_norm` is a global norm), so the update is
//! written out here: decoupled weight decay on matrices only (not on norms or biases), bias-
//! corrected moments, and one clipping scale for all gradients.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::Gradients;

use crate::model::CausalLm;

#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW`'s defaults except weight decay, which TRL leaves at 0.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0 }
    }
}

/// First and second moments of one parameter, flattened.
struct Moments {
    first: Tensor<1>,
    second: Tensor<1>,
}

impl Moments {
    fn on(self, device: &burn::tensor::Device) -> Moments {
        if self.first.device() == *device {
            return self;
        }
        Moments { first: self.first.to_device(device), second: self.second.to_device(device) }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken (the bias-correction exponent).
    pub steps: u64,
    moments: HashMap<ParamId, Moments>,
}

/// Gradients of every parameter, flattened and summed over the micro-batches of one optimizer
/// step (gradient accumulation).
#[derive(Default)]
pub struct AccumulatedGrads {
    grads: HashMap<ParamId, Tensor<1>>,
}

struct Collect<'a> {
    grads: &'a Gradients,
    into: &'a mut AccumulatedGrads,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = param.val().grad(self.grads) {
            self.into.insert_add(param.id, grad.reshape([-1]));
        }
    }
}

impl AccumulatedGrads {
    /// Adds the gradients of one backward pass.
    pub fn add(&mut self, model: &CausalLm, grads: &Gradients) {
        model.visit(&mut Collect { grads, into: self });
    }

    /// The L2 norm of all gradients together, as `torch.nn.utils.clip_grad_norm_` computes it.
    pub fn norm(&self) -> f64 {
        self.squared_norm().sqrt()
    }

    /// The sum of the squares of all gradients (the parts of a sharded norm add up).
    pub fn squared_norm(&self) -> f64 {
        self.grads.values().map(squared_norm).sum::<f64>()
    }

    /// Adds `grad` to the sum kept for `id`.
    pub fn insert_add(&mut self, id: ParamId, grad: Tensor<1>) {
        let sum = match self.grads.remove(&id) {
            Some(previous) => previous + grad,
            None => grad,
        };
        self.grads.insert(id, sum);
    }

    /// The gradients, by parameter.
    pub fn into_parts(self) -> HashMap<ParamId, Tensor<1>> {
        self.grads
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }
}

/// The sum of the squares of one gradient's values (in f64 on flex, one pass on every core).
fn squared_norm(grad: &Tensor<1>) -> f64 {
    #[cfg(feature = "flex")]
    if let Some(host) = crate::ops::host::HostF32::of(grad.clone()) {
        use rayon::prelude::*;
        return host.values().par_chunks(1 << 14).map(|chunk| chunk.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>()).sum();
    }
    grad.clone().square().sum().into_scalar::<f32>() as f64
}

/// torch's `clip_grad_norm_` factor for a global norm `norm`: `max / (norm + 1e-6)` when that
/// is below 1.
pub fn clip_scale(norm: f64, max_grad_norm: Option<f64>) -> f64 {
    match max_grad_norm {
        Some(max) => (max / (norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

/// One step's AdamW constants, as the f32 values the element-wise arithmetic uses.
struct Hyper {
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 / sqrt(1 - beta2^t)`, folded into the denominator as torch.optim.AdamW does.
    inverse_root_correction2: f32,
    epsilon: f32,
    /// `lr / (1 - beta1^t)`.
    step_size: f32,
    decay: f32,
}

impl Hyper {
    fn new(config: &AdamWConfig, t: i32, lr: f64, grad_scale: f64, decay: f64) -> Self {
        Hyper {
            grad_scale: grad_scale as f32,
            beta1: config.beta1 as f32,
            one_minus_beta1: (1.0 - config.beta1) as f32,
            beta2: config.beta2 as f32,
            one_minus_beta2: (1.0 - config.beta2) as f32,
            inverse_root_correction2: (1.0 / (1.0 - config.beta2.powi(t)).sqrt()) as f32,
            epsilon: config.epsilon as f32,
            step_size: (lr / (1.0 - config.beta1.powi(t))) as f32,
            decay: decay as f32,
        }
    }

    /// The updated value and moments of one flattened parameter.
    fn step(&self, value: Tensor<1>, grad: Tensor<1>, previous: Option<Moments>) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
        #[cfg(feature = "flex")]
        let (value, grad, previous) = match self.step_on_host(value, grad, previous) {
            Ok(updated) => return updated,
            Err(inputs) => inputs,
        };
        self.step_on_tensors(value, grad, previous)
    }

    fn step_on_tensors(&self, value: Tensor<1>, grad: Tensor<1>, previous: Option<Moments>) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
        let grad = grad * self.grad_scale;
        let (first, second) = match previous {
            Some(m) => (m.first * self.beta1 + grad.clone() * self.one_minus_beta1, m.second * self.beta2 + grad.square() * self.one_minus_beta2),
            None => (grad.clone() * self.one_minus_beta1, grad.square() * self.one_minus_beta2),
        };
        // torch.optim.AdamW's arithmetic: the bias corrections are scalars folded into the
        // denominator and the step size, so a parameter's update needs two temporaries of its
        // size (the denominator, the step); burn reuses the moments' and the weight's own
        // buffers for the rest.
        let denominator = second.clone().sqrt() * self.inverse_root_correction2 + self.epsilon;
        let step = first.clone() * self.step_size / denominator;
        (value * self.decay - step, first, second)
    }

    /// [`Hyper::step`] as one pass over the four arrays on every core, when all of them are f32
    /// on flex (where each tensor operation above is a pass on one thread); the inputs back
    /// otherwise. The same f32 arithmetic in the same order, so the results are identical.
    /// The new value is written over the gradient, which is not needed after.
    #[cfg(feature = "flex")]
    #[allow(clippy::type_complexity)]
    fn step_on_host(
        &self,
        value: Tensor<1>,
        grad: Tensor<1>,
        previous: Option<Moments>,
    ) -> Result<(Tensor<1>, Tensor<1>, Tensor<1>), (Tensor<1>, Tensor<1>, Option<Moments>)> {
        use crate::ops::host::HostF32;
        use rayon::prelude::*;
        let (Some(host_value), Some(mut host_grad)) = (HostF32::of(value.clone()), HostF32::of(grad.clone())) else {
            return Err((value, grad, previous));
        };
        let zeros = || Tensor::<1>::zeros(grad.dims(), (&grad.device(), burn::tensor::DType::F32));
        let (first, second) = match &previous {
            Some(m) => (m.first.clone(), m.second.clone()),
            None => (zeros(), zeros()),
        };
        let (Some(mut host_first), Some(mut host_second)) = (HostF32::of(first), HostF32::of(second)) else {
            return Err((value, grad, previous));
        };
        // The tensors passed in are dropped so that the moments and the gradient are written in
        // place rather than copied.
        drop((value, grad, previous));
        const CHUNK: usize = 1 << 14;
        host_grad
            .values_mut()
            .par_chunks_mut(CHUNK)
            .zip(host_first.values_mut().par_chunks_mut(CHUNK))
            .zip(host_second.values_mut().par_chunks_mut(CHUNK))
            .zip(host_value.values().par_chunks(CHUNK))
            .for_each(|(((grad, first), second), value)| {
                for (((g, m), v), &w) in grad.iter_mut().zip(first.iter_mut()).zip(second.iter_mut()).zip(value) {
                    let scaled = *g * self.grad_scale;
                    // Absent moments are zeros here: `0 · β1 + x` is exactly `x`.
                    *m = *m * self.beta1 + scaled * self.one_minus_beta1;
                    *v = *v * self.beta2 + scaled * scaled * self.one_minus_beta2;
                    let denominator = v.sqrt() * self.inverse_root_correction2 + self.epsilon;
                    *g = w * self.decay - *m * self.step_size / denominator;
                }
            });
        Ok((host_grad.into_tensor(), host_first.into_tensor(), host_second.into_tensor()))
    }
}

struct Update<'a> {
    optimizer: &'a mut AdamW,
    grads: &'a mut AccumulatedGrads,
    lr: f64,
    grad_scale: f64,
}

impl ModuleMapper for Update<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = self.grads.grads.remove(&param.id) else { return param };
        let id = param.id;
        let config = self.optimizer.config.clone();
        let t = self.optimizer.steps as i32;
        let (lr, scale) = (self.lr, self.grad_scale);
        let moments = &mut self.optimizer.moments;
        param.map(|value| {
            let shape = value.dims();
            // The update runs off the graph; the new leaf keeps the device's checkpointing
            // strategy, which `from_inner` would reset.
            let strategy = value.gradient_checkpointing_strategy();
            let value = value.inner().reshape([-1]);
            // Matrices decay; norms and biases (1-D) do not, as in HF Trainer and TRL.
            let decay = if D >= 2 { 1.0 - lr * config.weight_decay } else { 1.0 };
            let hyper = Hyper::new(&config, t, lr, scale, decay);
            // Moments restored from a checkpoint sit on the first device until the step of a
            // sharded optimizer moves each to the device that owns its parameter.
            let previous = moments.remove(&id).map(|m| m.on(&grad.device()));
            let (updated, first, second) = hyper.step(value, grad, previous);
            moments.insert(id, Moments { first, second });
            let updated = Tensor::from_inner(updated.reshape(shape));
            let updated = match strategy {
                Some(strategy) => updated.with_gradient_checkpointing_strategy(strategy),
                None => updated,
            };
            updated.require_grad()
        })
    }
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, steps: 0, moments: HashMap::new() }
    }

    /// One optimizer step at learning rate `lr` from one backward pass (see [`AdamW::step_accumulated`]).
    pub fn step(&mut self, model: CausalLm, grads: &Gradients, lr: f64, max_grad_norm: Option<f64>) -> (CausalLm, f64) {
        let mut accumulated = AccumulatedGrads::default();
        accumulated.add(&model, grads);
        self.step_accumulated(model, accumulated, lr, max_grad_norm)
    }

    /// One optimizer step at learning rate `lr`; gradients are first clipped to a global norm
    /// of `max_grad_norm` (when given). Returns the model and the norm before clipping.
    pub fn step_accumulated(
        &mut self,
        model: CausalLm,
        mut grads: AccumulatedGrads,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> (CausalLm, f64) {
        let norm = grads.norm();
        self.steps += 1;
        let model = self.apply(model, &mut grads, lr, clip_scale(norm, max_grad_norm));
        (model, norm)
    }

    /// The update of the step under way (`steps` already counts it) to the parameters that
    /// `grads` has gradients for, scaled by `grad_scale`; the others are left as they are.
    pub fn apply(&mut self, model: CausalLm, grads: &mut AccumulatedGrads, lr: f64, grad_scale: f64) -> CausalLm {
        let mut update = Update { optimizer: self, grads, lr, grad_scale };
        model.map(&mut update)
    }
}

/// Parameters in visiting order with their module paths: the same architecture always visits
/// them in the same order, which is what lets optimizer state outlive `ParamId`s (new ones are
/// drawn when a checkpoint is loaded).
struct Ordered {
    path: Vec<String>,
    params: Vec<(String, ParamId)>,
}

impl ModuleVisitor for Ordered {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = format!("{}.{}", self.params.len(), self.path.join("."));
        self.params.push((name, param.id));
    }
}

fn ordered_params(model: &CausalLm) -> Vec<(String, ParamId)> {
    let mut visitor = Ordered { path: Vec::new(), params: Vec::new() };
    model.visit(&mut visitor);
    visitor.params
}

/// One parameter's optimizer state on the host, for checkpoints.
pub struct SavedMoments {
    pub name: String,
    pub first: Vec<f32>,
    pub second: Vec<f32>,
}

impl AdamW {
    /// The parameters of `model` that have moments: their names (visiting order + path) and
    /// sizes, so a checkpoint can lay out its file before reading any values.
    pub fn state_entries(&self, model: &CausalLm) -> Vec<(String, ParamId, usize)> {
        ordered_params(model)
            .into_iter()
            .filter_map(|(name, id)| self.moments.get(&id).map(|m| (name, id, m.first.dims()[0])))
            .collect()
    }

    /// Moves each parameter's moments to the device `device_of` names (a sharded optimizer's
    /// owner), so that a resumed run holds them where its steps will use them.
    pub fn place_moments(&mut self, device_of: impl Fn(ParamId) -> Option<burn::tensor::Device>) {
        let ids: Vec<ParamId> = self.moments.keys().copied().collect();
        for id in ids {
            if let (Some(device), Some(moments)) = (device_of(id), self.moments.remove(&id)) {
                self.moments.insert(id, moments.on(&device));
            }
        }
    }

    /// One moment of one parameter on the host (`second`: the squared-gradient average).
    pub fn moment_values(&self, id: ParamId, second: bool) -> Option<Vec<f32>> {
        let moments = self.moments.get(&id)?;
        let tensor = if second { &moments.second } else { &moments.first };
        tensor.clone().into_data().convert::<f32>().as_slice::<f32>().ok().map(<[f32]>::to_vec)
    }

    /// Restores moments saved under [`AdamW::state_entries`]' names onto `model`'s parameters,
    /// one parameter at a time as `saved` reads them.
    pub fn load_state(
        &mut self,
        model: &CausalLm,
        steps: u64,
        saved: impl IntoIterator<Item = Result<SavedMoments, String>>,
    ) -> Result<(), String> {
        let params: HashMap<String, ParamId> = ordered_params(model).into_iter().collect();
        let device = model.embed_tokens.weight.val().device();
        // Moments live off the autodiff graph, like the gradients they are made from.
        let device = device.inner();
        self.moments.clear();
        for entry in saved {
            let entry = entry?;
            let id = params.get(&entry.name).ok_or_else(|| format!("optimizer state for `{}` matches no parameter", entry.name))?;
            let tensor = |values: Vec<f32>| {
                let len = values.len();
                Tensor::<1>::from_data(burn::tensor::TensorData::new(values, [len]), &device)
            };
            self.moments.insert(*id, Moments { first: tensor(entry.first), second: tensor(entry.second) });
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    fn values(t: Tensor<1>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 values")
    }

    /// The one-pass host step gives exactly the tensor operations' results, on the first step
    /// (no moments yet) and on a later one, with clipping and decay.
    #[test]
    fn the_host_step_equals_the_tensor_step_exactly() {
        let device = crate::device::parse("flex").expect("flex");
        let n = 100_003;
        let random = || Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
        let mut moments: Option<(Tensor<1>, Tensor<1>)> = None;
        let mut value = random();
        for t in 1..=3 {
            let grad = random() * 1e-2;
            let hyper = Hyper::new(&config, t, 3e-4, 0.7, 1.0 - 3e-4 * 0.1);
            let previous = || moments.clone().map(|(first, second)| Moments { first, second });
            // Copies, so that the host step's in-place writes cannot reach the other side.
            let copy = |t: &Tensor<1>| Tensor::<1>::from_data(TensorData::new(values(t.clone()), [n]), &device);
            let expected = hyper.step_on_tensors(copy(&value), copy(&grad), previous());
            let (updated, first, second) = hyper.step(value.clone(), grad, previous());
            assert_eq!(values(updated.clone()), values(expected.0), "step {t}: weights");
            assert_eq!(values(first.clone()), values(expected.1), "step {t}: first moment");
            assert_eq!(values(second.clone()), values(expected.2), "step {t}: second moment");
            assert_ne!(values(updated.clone()), values(value.clone()), "step {t} changed the weights");
            value = updated;
            moments = Some((first, second));
        }
    }

    #[test]
    fn the_host_norm_equals_the_tensor_norm() {
        let device = crate::device::parse("flex").expect("flex");
        let grad = Tensor::<1>::random([70_001], Distribution::Normal(0.0, 1.0), &device);
        let on_tensors = grad.clone().square().sum().into_scalar::<f32>() as f64;
        let on_host = squared_norm(&grad);
        assert!((on_host - on_tensors).abs() <= 1e-5 * on_tensors, "{on_host} vs {on_tensors}");
    }
}
