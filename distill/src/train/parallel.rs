//! Data parallelism over the devices of one machine (`--devices`): one replica of the model per
//! device, each running its share of a step's micro-batches; the gradients are summed on the
//! device that owns each parameter, the owner takes the AdamW step, and every other replica
//! receives the new weights.
//!
//! Without `--shard-optimizer` the first device owns every parameter: it holds all AdamW
//! moments, and the others hold none (what DDP computes, with the update done once instead of on
//! every device). With it the trainable parameters are spread over the devices by size (ZeRO
//! stage 1: each device keeps the moments of its share only and updates that share), so
//! optimizer memory per device falls by the number of devices.
//!
//! burn 0.22's collective all-reduce exists for CUDA (NCCL) and its remote backend only, and
//! needs every device on one backend; these transfers (`Tensor::to_device`) work between any
//! two devices burn has, mixed backends included, and sum in device order, so a run's numbers
//! do not depend on which device finished first.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor};

use super::optim::{AccumulatedGrads, AdamW, clip_scale};
use crate::model::{CausalLm, Model};

/// One model per device, kept identical from step to step.
pub struct Replicas {
    devices: Vec<Device>,
    models: Vec<Model>,
    /// The device that sums, clips and updates each trainable parameter.
    owners: HashMap<ParamId, usize>,
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
    /// or is empty for the model's device alone.
    pub fn new(model: Model, devices: &[Device], shard_optimizer: bool) -> Replicas {
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
        Replicas { devices, models, owners }
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The replica of device `index`.
    pub fn model(&self, index: usize) -> &Model {
        &self.models[index]
    }

    /// The first device's replica (they are all equal between steps).
    pub fn primary(&self) -> &Model {
        &self.models[0]
    }

    pub fn into_primary(self) -> Model {
        self.models.into_iter().next().expect("one replica at least")
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

    /// One optimizer step from each device's gradients (`grads[d]` for device `d`): reduce to
    /// the owners, clip by the global norm, update on the owners, gather the new weights.
    /// Returns the global gradient norm before clipping.
    pub fn step(&mut self, optimizer: &mut AdamW, grads: Vec<AccumulatedGrads>, lr: f64, max_grad_norm: Option<f64>) -> f64 {
        let inner: Vec<Device> = self.devices.iter().map(|d| d.clone().inner()).collect();
        let mut reduced: Vec<AccumulatedGrads> = (0..self.len()).map(|_| AccumulatedGrads::default()).collect();
        for (device, grads) in grads.into_iter().enumerate() {
            for (id, grad) in grads.into_parts() {
                let owner = self.owners.get(&id).copied().unwrap_or(0);
                let grad = if owner == device { grad } else { grad.to_device(&inner[owner]) };
                reduced[owner].insert_add(id, grad);
            }
        }
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
            self.gather();
        }
        norm
    }

    /// Every replica takes each parameter's new value from its owner.
    fn gather(&mut self) {
        let mut updated: HashMap<ParamId, (Tensor<1>, Vec<usize>)> = HashMap::new();
        for (owner, model) in self.models.iter().enumerate() {
            model.net.visit(&mut Collect { owners: &self.owners, owner, into: &mut updated });
        }
        for (index, model) in self.models.iter_mut().enumerate() {
            let device = self.devices[index].clone().inner();
            let mut assign = Assign { owners: &self.owners, index, values: &updated, device };
            model.net = model.net.clone().map(&mut assign);
        }
    }
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
    device: Device,
}

impl ModuleMapper for Assign<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match (self.owners.get(&param.id), self.values.get(&param.id)) {
            (Some(&owner), Some((value, dims))) if owner != self.index => {
                let dims: [usize; D] = dims.as_slice().try_into().expect("the same parameter has the same rank everywhere");
                let value = value.clone().to_device(&self.device).reshape(dims);
                param.map(|old| {
                    let strategy = old.gradient_checkpointing_strategy();
                    let new = Tensor::from_inner(value);
                    let new = match strategy {
                        Some(strategy) => new.with_gradient_checkpointing_strategy(strategy),
                        None => new,
                    };
                    new.require_grad()
                })
            }
            _ => param,
        }
    }
}
