//! Activation checkpointing at the level of a whole module (a decoder layer), as transformers'
//! `gradient_checkpointing_enable` does it: the forward pass runs the module off the autodiff
//! graph and keeps only its input; the backward pass runs it again on that input under a graph of
//! its own, backpropagates the output's gradient through it, and hands back the gradients of
//! the input and of the module's parameters.
//!
//! The parameters are inputs of the operation, so their gradients reach the outer graph through
//! it (for a mixed-precision compute copy, through the casts to the f32 master weights). The
//! recomputation uses fresh leaves for the parameters and the input: a node of the outer graph
//! must not appear in the inner one, whose backward runs while the outer graph is locked.
//! Randomness inside the module (LoRA dropout) must be seeded by the module itself so that the
//! recomputation draws what the forward pass drew.
//!
//! With offloading (TRL's `activation_offloading`), the kept input waits in host memory (on
//! flex) and comes back to the device for its recomputation: a GPU then holds one layer's input
//! at a time instead of every layer's.

use std::fmt;
use std::sync::Arc;

use burn::backend::DispatchTensor;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};

use super::{Differentiable, MAX_INPUTS, apply, ranked};

/// The module's forward pass, for whatever device its input is on.
pub type Forward<M> = Arc<dyn Fn(&M, Tensor<3>) -> Tensor<3> + Send + Sync>;

struct CheckpointOp<M> {
    module: M,
    forward: Forward<M>,
    offload: Option<Offload>,
}

/// Where a kept input waits, and the device it goes back to.
#[derive(Clone)]
struct Offload {
    host: Device,
    home: Device,
}

impl<M: Clone> Clone for CheckpointOp<M> {
    fn clone(&self) -> Self {
        CheckpointOp { module: self.module.clone(), forward: self.forward.clone(), offload: self.offload.clone() }
    }
}

impl<M> fmt::Debug for CheckpointOp<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CheckpointOp")
    }
}

/// The float parameters of a module in visiting order, rank erased.
struct Parameters(Vec<DispatchTensor>);

impl ModuleVisitor for Parameters {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().into_dispatch());
    }
}

/// Replaces every float parameter with a fresh leaf holding the same values, tracked where
/// `needed` says so.
struct FreshLeaves<'a> {
    needed: &'a [bool],
    index: usize,
}

impl ModuleMapper for FreshLeaves<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let tracked = self.needed[self.index];
        self.index += 1;
        param.map(|value| {
            let leaf = Tensor::from_inner(value.inner());
            if tracked { leaf.require_grad() } else { leaf }
        })
    }
}

/// Reads the gradient of every float parameter, in visiting order.
struct ReadGrads<'a> {
    grads: &'a burn::tensor::Gradients,
    found: Vec<Option<DispatchTensor>>,
}

impl ModuleVisitor for ReadGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.found.push(param.val().grad(self.grads).map(|g| g.inner().into_dispatch()));
    }
}

impl<M> Differentiable for CheckpointOp<M>
where
    M: Module + Clone + Send + Sync + 'static,
{
    /// The module's input, on the inner device (offloaded: on the host).
    type Saved = DispatchTensor;

    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>) {
        let input = ranked::<3>(inputs[0].clone());
        let output = (self.forward)(&self.module.valid(), input.clone());
        let kept = needed.map(|_| match &self.offload {
            Some(offload) => to_host(input, &offload.host).into_dispatch(),
            None => inputs[0].clone(),
        });
        (output.into_dispatch(), kept)
    }

    fn backward(&self, saved: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>> {
        let input = ranked::<3>(saved);
        let input = match &self.offload {
            Some(offload) => input.to_device(&offload.home),
            None => input,
        };
        let input = Tensor::from_inner(input);
        let input = if needed[0] { input.require_grad() } else { input };
        let module = self.module.clone().map(&mut FreshLeaves { needed: &needed[1..], index: 0 });
        let output = (self.forward)(&module, input.clone());
        // Backpropagating Σ(output ∘ g) seeds the recomputed graph with the output's gradient g.
        let grads = (output * Tensor::from_inner(ranked::<3>(output_grad))).sum().backward();
        let mut read = ReadGrads { grads: &grads, found: Vec::with_capacity(needed.len()) };
        read.found.push(input.grad(&grads).map(|g| g.inner().into_dispatch()));
        module.visit(&mut read);
        read.found
    }
}

/// `forward(module, input)` with only `input` kept for the backward pass (`offload`: kept in
/// host memory), where the module is run again. `module`'s parameters live on the autodiff
/// device (tracked or frozen); `forward` must work on the inner device too.
pub fn checkpoint<M>(module: &M, input: Tensor<3>, forward: Forward<M>, offload: bool) -> Tensor<3>
where
    M: Module + Clone + Send + Sync + 'static,
{
    // On flex the input is in host memory already.
    let offload = (offload && !crate::device::is_flex(&input.device())).then(|| Offload { host: host_device(), home: input.device().inner() });
    let mut parameters = Parameters(Vec::new());
    module.visit(&mut parameters);
    assert!(parameters.0.len() < MAX_INPUTS, "a checkpointed module has at most {} parameters", MAX_INPUTS - 1);
    let mut inputs = vec![input.into_dispatch()];
    inputs.extend(parameters.0);
    ranked(apply(CheckpointOp { module: module.clone(), forward, offload }, inputs))
}

/// `tensor` copied into host memory of its own. Read back from a GPU, its bytes can be a view
/// of the device allocator's staging buffer (so `to_device` alone leaves wgpu's accounting of
/// device memory where it was); one more copy on the host lets that buffer go.
fn to_host(tensor: Tensor<3>, host: &Device) -> Tensor<3> {
    let data = tensor.into_data();
    let own = TensorData::from_bytes_vec(data.as_bytes().to_vec(), data.shape().clone(), data.dtype());
    Tensor::from_data(own, host)
}

/// Host memory, as a device.
fn host_device() -> Device {
    crate::device::parse("flex").expect("--activation-offloading keeps the layer inputs on flex, which this build must include")
}
