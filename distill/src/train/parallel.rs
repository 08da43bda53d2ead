//! Data parallelism over the devices of one machine (`--devices`): one replica of the model per
//! device, each running its share of a step's micro-batches. After each round of micro-batches
//! (one per device) every gradient is sent to the device that owns its parameter and summed
//! there in f32; at the end of the step the owner clips and takes the AdamW step, and every
//! other replica receives the new weights.
//!
//! Without `--shard-optimizer` the first device owns every parameter: it holds all AdamW
//! moments and the gradient sum (what DDP computes, with the update done once instead of on
//! every device). With it the trainable parameters are spread over the devices by size, as
//! ZeRO does: each device keeps the moments and the gradient sum of its share only (stage 2),
//! and under mixed precision also holds f32 master weights for its share only, the other
//! parameters in the compute dtype (whose gradients then arrive in that dtype and are widened
//! by their owner).
//!
//! burn 0.22's collective all-reduce exists for CUDA (NCCL) and its remote backend only, and
//! needs every device on one backend; these transfers (`Tensor::to_device`) work between any
//! two devices burn has, mixed backends included, and sum in device order, so a run's numbers
//! do not depend on which device finished first.

use std::borrow::Cow;
use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Device, Tensor};

use super::optim::{AccumulatedGrads, AdamW, clip_scale};
use crate::model::{CausalLm, Model};

/// One model per device, equal from step to step (each parameter at full precision on its
/// owner, in the compute dtype elsewhere when narrowed).
pub struct Replicas {
    devices: Vec<Device>,
    models: Vec<Model>,
    /// The device that sums, clips and updates each trainable parameter.
    owners: HashMap<ParamId, usize>,
    /// Per device, the step's gradient sum (f32) of the parameters it owns.
    accumulated: Vec<AccumulatedGrads>,
    /// Replicas hold the parameters they do not own in this dtype (sharded mixed precision).
    narrowed: Option<DType>,
}

/// Trainable parameters in visiting order, with their element counts.
struct Trainable(Vec<(ParamId, usize)>);

impl ModuleVisitor for Trainable {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if value.is_require_grad() {
            self.0.push((param.id, value.shape().num_elements()));
        }
    }
}

/// Each trainable parameter to a device: largest first, each to the device that owns the fewest
/// elements so far (the first of equals), so the shares are balanced to within one parameter
/// and the same model always splits the same way.
pub fn assign_owners(net: &CausalLm, devices: usize, shard: bool) -> HashMap<ParamId, usize> {
    let mut trainable = Trainable(Vec::new());
    net.visit(&mut trainable);
    if !shard {
        return trainable.0.into_iter().map(|(id, _)| (id, 0)).collect();
    }
    let mut params: Vec<(usize, ParamId, usize)> = trainable.0.into_iter().enumerate().map(|(order, (id, size))| (order, id, size)).collect();
    params.sort_by_key(|&(order, _, size)| (std::cmp::Reverse(size), order));
    let mut load = vec![0usize; devices.max(1)];
    params
        .into_iter()
        .map(|(_, id, size)| {
            let owner = (0..load.len()).min_by_key(|&d| (load[d], d)).expect("one device at least");
            load[owner] += size;
            (id, owner)
        })
        .collect()
}

impl Replicas {
    /// `model` is the first device's replica; `devices` lists every device (the model's first),
    /// or is empty for the model's device alone. With `shard_optimizer` and a `compute_dtype`,
    /// each replica keeps f32 only for the parameters it owns.
    pub fn new(model: Model, devices: &[Device], shard_optimizer: bool, compute_dtype: Option<DType>) -> Replicas {
        let devices: Vec<Device> = if devices.is_empty() { vec![model.device.clone()] } else { devices.to_vec() };
        let owners = assign_owners(&model.net, devices.len(), shard_optimizer);
        let mut models = vec![model];
        for device in &devices[1..] {
            let first = &models[0];
            // `fork` detaches the copy from the first replica's graph and keeps the parameter
            // ids, so gradients and optimizer state name a parameter the same on every device.
            let net = first.net.clone().fork(device);
            models.push(Model { config: first.config.clone(), net, rope: first.rope.clone(), device: device.clone(), dtype: first.dtype });
        }
        let narrowed = compute_dtype.filter(|&dtype| shard_optimizer && devices.len() > 1 && dtype != DType::F32);
        if let Some(dtype) = narrowed {
            for (index, model) in models.iter_mut().enumerate() {
                model.net = model.net.clone().map(&mut Narrow { owners: &owners, index, dtype });
            }
        }
        let accumulated = (0..devices.len()).map(|_| AccumulatedGrads::default()).collect();
        Replicas { devices, models, owners, accumulated, narrowed }
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Puts the moments `optimizer` holds (a checkpoint's, read onto the first device) on the
    /// devices that own their parameters.
    pub fn place_moments(&self, optimizer: &mut AdamW) {
        if self.len() > 1 {
            optimizer.place_moments(|id| self.owners.get(&id).map(|&owner| self.devices[owner].clone().inner()));
        }
    }

    /// The first replica for forward passes off the graph (eval): under sharded mixed
    /// precision in the compute dtype throughout, which is what its steps compute with.
    pub fn inference_model(&self) -> Model {
        let model = self.models[0].for_inference();
        match self.narrowed {
            Some(dtype) => model.compute_copy(dtype),
            None => model,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The replica of device `index`.
    pub fn model(&self, index: usize) -> &Model {
        &self.models[index]
    }

    /// The model as training has it, every parameter at full precision: the first replica, or
    /// under sharded mixed precision a copy with each parameter's f32 value from its owner.
    pub fn full_model(&self) -> Cow<'_, Model> {
        self.with_owned_values(Some(self.devices[0].clone().inner()))
    }

    /// What a checkpoint writes: [`Self::full_model`], except that under sharded mixed
    /// precision each parameter's f32 value stays on the device that owns it, so nothing is
    /// gathered (a 7B model's f32 copy would be 28 GB more on the first device). The checkpoint
    /// writer reads one tensor at a time from wherever it is; nothing may compute with this.
    pub fn checkpoint_view(&self) -> Cow<'_, Model> {
        self.with_owned_values(None)
    }

    /// The first replica with every parameter's f32 value from its owner, moved to `device`
    /// (`None`: left where it is).
    fn with_owned_values(&self, device: Option<Device>) -> Cow<'_, Model> {
        if self.narrowed.is_none() {
            return Cow::Borrowed(&self.models[0]);
        }
        let updated = self.owned_values();
        let net = self.models[0].net.clone().map(&mut Assign { owners: &self.owners, index: 0, values: &updated, device, as_received: true });
        Cow::Owned(Model { net, ..self.models[0].clone() })
    }

    pub fn into_full_model(self) -> Model {
        match self.full_model() {
            Cow::Owned(model) => model,
            Cow::Borrowed(_) => self.models.into_iter().next().expect("one replica at least"),
        }
    }

    /// How many trainable elements each device owns (for the plan and for tests).
    pub fn owned_elements(&self) -> Vec<usize> {
        let mut trainable = Trainable(Vec::new());
        self.models[0].net.visit(&mut trainable);
        let mut owned = vec![0; self.len()];
        for (id, size) in trainable.0 {
            owned[self.owners[&id]] += size;
        }
        owned
    }

    /// Adds one round of gradients (`grads[d]` from device `d`) to their owners' sums, in
    /// device order, widened to f32.
    pub fn reduce(&mut self, grads: Vec<AccumulatedGrads>) {
        let inner: Vec<Device> = self.devices.iter().map(|d| d.clone().inner()).collect();
        for (device, grads) in grads.into_iter().enumerate() {
            for (id, grad) in grads.into_parts() {
                let owner = self.owners.get(&id).copied().unwrap_or(0);
                let grad = if owner == device { grad } else { grad.to_device(&inner[owner]) };
                let grad = if grad.dtype() == DType::F32 { grad } else { grad.cast(DType::F32) };
                self.accumulated[owner].insert_add(id, grad);
            }
        }
    }

    /// The optimizer step of the gradients reduced since the last one: clip by the global
    /// norm, update on the owners, gather the new weights. Returns the norm before clipping.
    pub fn step(&mut self, optimizer: &mut AdamW, lr: f64, max_grad_norm: Option<f64>) -> f64 {
        let reduced: Vec<AccumulatedGrads> = self.accumulated.iter_mut().map(std::mem::take).collect();
        let norm = reduced.iter().map(AccumulatedGrads::squared_norm).sum::<f64>().sqrt();
        let scale = clip_scale(norm, max_grad_norm);
        optimizer.steps += 1;
        for (owner, mut grads) in reduced.into_iter().enumerate() {
            if !grads.is_empty() {
                let net = self.models[owner].net.clone();
                self.models[owner].net = optimizer.apply(net, &mut grads, lr, scale);
            }
        }
        if self.len() > 1 {
            let updated = self.owned_values();
            for (index, model) in self.models.iter_mut().enumerate() {
                let device = self.devices[index].clone().inner();
                let mut assign = Assign { owners: &self.owners, index, values: &updated, device: Some(device), as_received: false };
                model.net = model.net.clone().map(&mut assign);
            }
        }
        norm
    }

    /// Each owned parameter's value on its owner, flattened, with its shape.
    fn owned_values(&self) -> HashMap<ParamId, (Tensor<1>, Vec<usize>)> {
        let mut updated = HashMap::new();
        for (owner, model) in self.models.iter().enumerate() {
            model.net.visit(&mut Collect { owners: &self.owners, owner, into: &mut updated });
        }
        updated
    }
}

/// Replica `index` under sharded mixed precision: the trainable parameters it does not own in
/// `dtype`.
struct Narrow<'a> {
    owners: &'a HashMap<ParamId, usize>,
    index: usize,
    dtype: DType,
}

impl ModuleMapper for Narrow<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match self.owners.get(&param.id) {
            Some(&owner) if owner != self.index => {
                let dtype = self.dtype;
                param.map(|value| leaf_like(&value, value.clone().inner().cast(dtype)))
            }
            _ => param,
        }
    }
}

/// `value` as a fresh trainable leaf, with `old`'s checkpointing strategy.
fn leaf_like<const D: usize>(old: &Tensor<D>, value: Tensor<D>) -> Tensor<D> {
    let strategy = old.gradient_checkpointing_strategy();
    let new = Tensor::from_inner(value);
    let new = match strategy {
        Some(strategy) => new.with_gradient_checkpointing_strategy(strategy),
        None => new,
    };
    new.require_grad()
}

/// The values of the parameters that `owner` owns, flattened, with their shapes.
struct Collect<'a> {
    owners: &'a HashMap<ParamId, usize>,
    owner: usize,
    into: &'a mut HashMap<ParamId, (Tensor<1>, Vec<usize>)>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.owners.get(&param.id) == Some(&self.owner) {
            let value = param.val().inner();
            let dims = value.dims().to_vec();
            self.into.insert(param.id, (value.reshape([-1]), dims));
        }
    }
}

/// Replaces the parameters that replica `index` does not own with their owners' values.
struct Assign<'a> {
    owners: &'a HashMap<ParamId, usize>,
    index: usize,
    values: &'a HashMap<ParamId, (Tensor<1>, Vec<usize>)>,
    /// Where the values go; `None`: they stay on their owners.
    device: Option<Device>,
    /// Keep the owner's dtype (f32) instead of the replica's own.
    as_received: bool,
}

impl ModuleMapper for Assign<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match (self.owners.get(&param.id), self.values.get(&param.id)) {
            (Some(&owner), Some((value, dims))) if owner != self.index => {
                let dims: [usize; D] = dims.as_slice().try_into().expect("the same parameter has the same rank everywhere");
                param.map(|old| {
                    // Sent in the receiver's dtype (a narrowed replica's bf16: half the bytes).
                    let value = if self.as_received || value.dtype() == old.dtype() { value.clone() } else { value.clone().cast(old.dtype()) };
                    let value = match &self.device {
                        Some(device) => value.to_device(device),
                        None => value,
                    };
                    leaf_like(&old, value.reshape(dims))
                })
            }
            _ => param,
        }
    }
}
