//! Differentiable operations with a backward pass of their own: attention that keeps O(S) per
//! layer ([`attention`]), a cross-entropy that never forms `[S, vocab]` logits
//! ([`cross_entropy`]), and decoder layers recomputed in the backward pass ([`checkpoint`]).
//!
//! Each operation is written once, with burn tensor operations on the device's inner
//! (non-autodiff) backend, so the same code runs on flex, wgpu and the CubeCL GPU backends. This
//! module registers such an operation as one node of burn's autodiff graph (the
//! backend-extension `Backward` API): the forward pass runs off the graph and saves what its
//! backward pass needs, and the backward pass turns the output's gradient into the inputs'.

pub mod attention;
#[cfg(feature = "flex")]
mod attention_host;
#[cfg(feature = "flex")]
pub mod blas;
pub mod checkpoint;
pub mod cross_entropy;
pub mod dense;
#[cfg(feature = "flex")]
pub mod host;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod quantized;
pub mod swiglu;

use std::fmt::Debug;
use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, BackendTensor, DispatchAutodiffContext, DispatchDevice, DispatchKindConversion,
    DispatchTensor, GradientCheckpointingStrategy, TensorMetadata,
};
use burn::tensor::Tensor;

/// An operation written with tensor ops on the inner device. Tensors cross this interface as
/// [`DispatchTensor`]s (any rank; `Tensor::from_dispatch` gives them a rank back).
pub trait Differentiable: Clone + Send + Sync + Debug + 'static {
    /// What the backward pass needs, made by the forward pass.
    type Saved: Clone + Send + Debug + 'static;

    /// The output, and what the backward pass will need when one will follow: `needed` then
    /// says which inputs want a gradient.
    fn forward(&self, inputs: &[DispatchTensor], needed: Option<&[bool]>) -> (DispatchTensor, Option<Self::Saved>);

    /// The gradient of each input whose `needed` flag is set, from the output's gradient.
    fn backward(&self, saved: Self::Saved, output_grad: DispatchTensor, needed: &[bool]) -> Vec<Option<DispatchTensor>>;
}

/// The most inputs an operation takes (a decoder layer: its input and up to 31 parameters).
pub const MAX_INPUTS: usize = 32;

/// Runs `op` on `inputs`; on an autodiff device the result is one node of the graph.
pub fn apply<O: Differentiable>(op: O, inputs: Vec<DispatchTensor>) -> DispatchTensor {
    assert!(!inputs.is_empty() && inputs.len() <= MAX_INPUTS, "an operation takes 1 to {MAX_INPUTS} inputs");
    let context = inputs.iter().fold(DispatchAutodiffContext::Disabled, |context, t| context.merge(t.autodiff));
    let DispatchAutodiffContext::Enabled(strategy) = context else {
        return op.forward(&inputs, None).0;
    };
    let device = inputs.iter().find(|t| t.autodiff != DispatchAutodiffContext::Disabled).map(|t| t.device()).expect("an enabled input");
    let DispatchDevice::Autodiff(device) = device else { unreachable!("an enabled tensor lives on an autodiff device") };
    let balanced = strategy == GradientCheckpointingStrategy::Balanced;
    match &*device {
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) if balanced => on_autodiff::<burn::backend::Flex, BalancedCheckpointing, O>(op, inputs),
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => on_autodiff::<burn::backend::Flex, NoCheckpointing, O>(op, inputs),
        #[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal", feature = "webgpu", feature = "cuda", feature = "rocm"))]
        DispatchDevice::Cube(_) if balanced => on_autodiff::<burn::backend::Cube, BalancedCheckpointing, O>(op, inputs),
        #[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal", feature = "webgpu", feature = "cuda", feature = "rocm"))]
        DispatchDevice::Cube(_) => on_autodiff::<burn::backend::Cube, NoCheckpointing, O>(op, inputs),
        #[allow(unreachable_patterns)]
        other => panic!("distill's training operations run on flex and the CubeCL backends, not on {other:?}"),
    }
}

/// A rank-erased tensor as a ranked one.
pub fn ranked<const D: usize>(tensor: DispatchTensor) -> Tensor<D> {
    Tensor::from_dispatch(tensor)
}

fn lift<B: Backend>(primitive: B::FloatTensorPrimitive) -> DispatchTensor
where
    DispatchTensor: DispatchKindConversion<B>,
{
    <DispatchTensor as DispatchKindConversion<B>>::from_backend(BackendTensor::Float(primitive))
}

fn lower<B: Backend>(tensor: DispatchTensor) -> B::FloatTensorPrimitive
where
    DispatchTensor: DispatchKindConversion<B>,
{
    <DispatchTensor as DispatchKindConversion<B>>::try_into_backend(tensor)
        .unwrap_or_else(|e| panic!("an operation returned a tensor of another backend: {e}"))
        .float()
}

type AutodiffFloat<B, C> = burn::backend::tensor::FloatTensor<Autodiff<B, C>>;

fn on_autodiff<B, C, O>(op: O, inputs: Vec<DispatchTensor>) -> DispatchTensor
where
    B: Backend,
    C: CheckpointStrategy,
    O: Differentiable,
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B, C>>,
{
    // Inputs off the graph (constants) join it as untracked leaves.
    let tensors: Vec<AutodiffFloat<B, C>> = inputs
        .into_iter()
        .map(|tensor| match tensor.autodiff {
            DispatchAutodiffContext::Disabled => <Autodiff<B, C> as AutodiffBackend>::from_inner(lower::<B>(tensor)),
            DispatchAutodiffContext::Enabled(_) => <DispatchTensor as DispatchKindConversion<Autodiff<B, C>>>::try_into_backend(tensor)
                .unwrap_or_else(|e| panic!("an operation's inputs must share one device: {e}"))
                .float(),
        })
        .collect();
    let count = tensors.len();
    let needed: Vec<bool> = tensors.iter().map(|t| t.is_tracked()).collect();
    let inner: Vec<DispatchTensor> = tensors.iter().map(|t| lift::<B>(t.primitive().clone())).collect();
    // Unused parent slots hold an untracked node, which the graph ignores.
    let filler = <Autodiff<B, C> as AutodiffBackend>::from_inner(tensors[0].primitive().clone());
    let mut guards: Vec<NodeGuard> = tensors.iter().map(|t| t.node()).collect();
    guards.extend((count..MAX_INPUTS).map(|_| filler.node()));
    let guards: [NodeGuard; MAX_INPUTS] = guards.try_into().unwrap_or_else(|_| unreachable!("padded to MAX_INPUTS"));
    let output = match Step::<O>(PhantomData).prepare::<C>(guards).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (output, saved) = op.forward(&inner, Some(&needed));
            let saved = saved.expect("a tracked forward pass saves its state");
            prep.finish((op, saved, count), lower::<B>(output))
        }
        OpsKind::UnTracked(prep) => prep.finish(lower::<B>(op.forward(&inner, None).0)),
    };
    <DispatchTensor as DispatchKindConversion<Autodiff<B, C>>>::from_backend(BackendTensor::Float(output))
}

#[derive(Debug)]
struct Step<O>(PhantomData<O>);

impl<B, O> Backward<B, MAX_INPUTS> for Step<O>
where
    B: Backend,
    O: Differentiable,
    DispatchTensor: DispatchKindConversion<B>,
{
    type State = (O, O::Saved, usize);

    fn backward(self, ops: Ops<Self::State, MAX_INPUTS>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (op, saved, count) = ops.state;
        let output_grad = lift::<B>(grads.consume::<B>(&ops.node));
        let needed: Vec<bool> = ops.parents[..count].iter().map(Option::is_some).collect();
        let input_grads = op.backward(saved, output_grad, &needed);
        for (parent, grad) in ops.parents[..count].iter().zip(input_grads) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<B>(parent.id, lower::<B>(grad));
            }
        }
    }
}
