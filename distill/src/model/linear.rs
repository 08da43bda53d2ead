//! A projection `x·W (+ b)`, with W kept `[in, out]` as burn's `nn::Linear` keeps it (HF's
//! `weight` transposed). Its weight is dense, or, as QLoRA's frozen base, quantized per block:
//! the field names stay `weight` and `bias`, so a dense model's parameters are named as HF
//! names them.

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

/// Values per block: one scale for each run of 32 consecutive outputs of an input row.
pub const BLOCK: usize = 32;

/// Bits of a word of [`QuantizedWeight::values`].
const WORD_BITS: usize = 32;

#[derive(Module, Debug)]
pub struct Linear {
    /// `[in, out]`; `None` while the weight is held quantized.
    pub weight: Option<Param<Tensor<2>>>,
    /// The weight quantized (QLoRA's base), in place of `weight`.
    pub quantized: Option<QuantizedWeight>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub fn dense(weight: Param<Tensor<2>>, bias: Option<Param<Tensor<1>>>) -> Linear {
        Linear { weight: Some(weight), quantized: None, bias }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.weight, &self.quantized) {
            (Some(weight), _) => weight.dims(),
            (None, Some(quantized)) => quantized.dims(),
            (None, None) => unreachable!("a projection holds its weight dense or quantized"),
        }
    }

    /// The weight as values, `[in, out]`: a quantized one dequantized into f32.
    pub fn weight(&self) -> Tensor<2> {
        match (&self.weight, &self.quantized) {
            (Some(weight), _) => weight.val(),
            (None, Some(quantized)) => quantized.dequantize(),
            (None, None) => unreachable!("a projection holds its weight dense or quantized"),
        }
    }

    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let bias = self.bias.as_ref().map(Param::val);
        match (&self.weight, &self.quantized) {
            (Some(weight), _) => crate::ops::dense::linear(x, weight.val(), bias),
            (None, Some(quantized)) => crate::ops::quantized::linear(x, quantized, bias),
            (None, None) => unreachable!("a projection holds its weight dense or quantized"),
        }
    }

    /// The weight quantized to `bits` (4 or 8) with its scales in `scale_dtype`; the bias is
    /// kept as it is.
    pub fn quantize(self, bits: u8, scale_dtype: DType) -> Linear {
        let weight = self.weight();
        let quantized = QuantizedWeight::quantize(weight, bits, scale_dtype);
        Linear { weight: None, quantized: Some(quantized), bias: self.bias }
    }

    /// The weight dense again, in f32 and still frozen (what a LoRA merge folds the adapters
    /// into).
    pub fn dequantized(self) -> Linear {
        if !self.is_quantized() {
            return self;
        }
        let weight = Param::from_tensor(self.weight()).set_require_grad(false);
        Linear::dense(weight, self.bias)
    }
}

/// Whether a weight of dims `[in, out]` can be held quantized: its outputs split into whole
/// blocks (all projections of real models; some of the tiny test models' do not).
pub fn quantizable(dims: [usize; 2]) -> bool {
    dims[1] % BLOCK == 0
}

/// A frozen weight `[in, out]` in 4 or 8 bits per value: symmetric absmax blocks of 32
/// consecutive outputs (bitsandbytes' int4/int8 blocks), `w ≈ q · scale` with
/// `|q| ≤ 2^(bits−1) − 1`. The values are packed into 32-bit words on every device, so a 4-bit
/// weight takes half a byte per value wherever it is held, and the scales are a float tensor:
/// cloning either shares its storage, as a graph node that keeps the weight for its backward
/// pass does.
#[derive(Module, Debug)]
pub struct QuantizedWeight {
    /// `[in, out · bits / 32]` words (i32): output `j` of a row is in word `j / (32 / bits)`,
    /// at bit `(j mod (32 / bits)) · bits`, stored as `q + 2^(bits−1)`.
    pub values: Param<Tensor<2, Int>>,
    /// `[in, out / 32]`.
    pub scales: Param<Tensor<2>>,
}

impl QuantizedWeight {
    /// Quantizes `weight` `[in, out]` (its outputs a multiple of 32) on the host, where the
    /// rounding is the same whatever device holds it, and puts the result on its device.
    pub fn quantize(weight: Tensor<2>, bits: u8, scale_dtype: DType) -> QuantizedWeight {
        let dims = weight.dims();
        let device = weight.device();
        let values = weight.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values after convert");
        QuantizedWeight::from_rows(&values, dims, bits, scale_dtype, &device)
    }

    /// Quantizes `rows`, a row-major `[in, out]` weight.
    pub fn from_rows(rows: &[f32], [inputs, outputs]: [usize; 2], bits: u8, scale_dtype: DType, device: &Device) -> QuantizedWeight {
        assert!(bits == 4 || bits == 8, "QLoRA quantizes to 4 or 8 bits");
        assert!(quantizable([inputs, outputs]) && rows.len() == inputs * outputs, "a [{inputs}, {outputs}] weight does not split into blocks of {BLOCK}");
        let bits = bits as usize;
        let per_word = WORD_BITS / bits;
        let largest = ((1 << (bits - 1)) - 1) as f32;
        let offset = 1i32 << (bits - 1);
        let mut words = vec![0i32; rows.len() / per_word];
        let mut scales = vec![0f32; rows.len() / BLOCK];
        // Block by block, a block's words and scale written by one thread.
        use rayon::prelude::*;
        let blocks = rows.par_chunks_exact(BLOCK).zip(words.par_chunks_exact_mut(BLOCK / per_word)).zip(scales.par_iter_mut());
        blocks.for_each(|((values, words), scale)| {
            let absmax = values.iter().fold(0f32, |max, v| max.max(v.abs()));
            // Rounded to the stored dtype first, so that q is chosen against the scale that
            // dequantization will use.
            *scale = stored(if absmax > 0.0 { absmax / largest } else { 1.0 }, scale_dtype);
            for (index, value) in values.iter().enumerate() {
                let q = (value / *scale).round().clamp(-largest, largest) as i32 + offset;
                words[index / per_word] |= q << ((index % per_word) * bits);
            }
        });
        let values = Tensor::<2, Int>::from_data(TensorData::new(words, [inputs, outputs / per_word]), device);
        let scales = Tensor::<2>::from_data(TensorData::new(scales, [inputs, outputs / BLOCK]), device);
        let scales = if scale_dtype == DType::F32 { scales } else { scales.cast(scale_dtype) };
        // Frozen: neither takes a gradient.
        let scales = Param::from_tensor(scales).set_require_grad(false);
        QuantizedWeight { values: Param::initialized(burn::module::ParamId::new(), values), scales }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        let [inputs, blocks] = self.scales.dims();
        [inputs, blocks * BLOCK]
    }

    /// Bits per value.
    pub fn bits(&self) -> usize {
        let [_, words] = self.values.dims();
        WORD_BITS * words / self.dims()[1]
    }

    /// The weight in f32.
    pub fn dequantize(&self) -> Tensor<2> {
        dequantize(self.values.val(), self.scales.val())
    }
}

/// f32 weights from packed `values` `[rows, words]` and their `scales` `[rows, blocks]`: the
/// rows of a slice of a weight dequantize as the same rows of the whole.
pub fn dequantize(values: Tensor<2, Int>, scales: Tensor<2>) -> Tensor<2> {
    let [rows, words] = values.dims();
    let [_, blocks] = scales.dims();
    let outputs = blocks * BLOCK;
    let bits = WORD_BITS * words / outputs;
    if crate::device::is_flex(&values.device()) {
        return dequantize_on_host(values, scales, bits);
    }
    let per_word = WORD_BITS / bits;
    let mask = (1i64 << bits) - 1;
    let parts: Vec<Tensor<2, Int>> =
        (0..per_word).map(|k| values.clone().bitwise_right_shift_scalar((k * bits) as i64).bitwise_and_scalar(mask)).collect();
    let q = Tensor::stack::<3>(parts, 2).reshape([rows, blocks, BLOCK]).float();
    let q = q - (1i64 << (bits - 1)) as f64;
    let scales = if scales.dtype() == DType::F32 { scales } else { scales.cast(DType::F32) };
    (q * scales.unsqueeze_dim::<3>(2)).reshape([rows, outputs])
}

/// [`dequantize`] where the tensors are host memory (flex): one pass over the packed words,
/// rows split over the cores, instead of a chain of element-wise operations (one thread each
/// on flex) whose intermediates, four bytes a value apiece, fragment the heap.
fn dequantize_on_host(values: Tensor<2, Int>, scales: Tensor<2>, bits: usize) -> Tensor<2> {
    use rayon::prelude::*;
    let device = values.device();
    let [rows, words] = values.dims();
    let [_, blocks] = scales.dims();
    let outputs = blocks * BLOCK;
    let words_data = values.into_data().convert::<i32>();
    let scales_data = scales.into_data().convert::<f32>();
    let (packed, scales) = (words_data.as_slice::<i32>().expect("i32 words"), scales_data.as_slice::<f32>().expect("f32 scales"));
    let per_word = WORD_BITS / bits;
    let (mask, offset) = ((1u32 << bits) - 1, 1i32 << (bits - 1));
    let mut weight = vec![0f32; rows * outputs];
    weight.par_chunks_mut(outputs).enumerate().for_each(|(row, out)| {
        let (packed, scales) = (&packed[row * words..(row + 1) * words], &scales[row * blocks..(row + 1) * blocks]);
        for (j, value) in out.iter_mut().enumerate() {
            let word = packed[j / per_word] as u32;
            let q = ((word >> ((j % per_word) * bits)) & mask) as i32 - offset;
            *value = q as f32 * scales[j / BLOCK];
        }
    });
    Tensor::from_data(TensorData::new(weight, [rows, outputs]), &device)
}

/// `value` as the dtype stores it.
fn stored(value: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(value).to_f32(),
        DType::F16 => half::f16::from_f32(value).to_f32(),
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing and unpacking agree with the arithmetic written out, at both widths, with
    /// negative values (words whose top bit is set) and a zero block: on flex (unpacked on the
    /// host) and on wgpu (tensor operations).
    #[test]
    fn dequantizes_what_it_quantized() {
        for device in ["flex", "wgpu"] {
            dequantizes_on(&crate::device::parse(device).unwrap());
        }
    }

    fn dequantizes_on(device: &Device) {
        let (inputs, outputs) = (3, 64);
        let mut rows: Vec<f32> = (0..inputs * outputs).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        rows[BLOCK..2 * BLOCK].fill(0.0);
        for bits in [4u8, 8] {
            let weight = QuantizedWeight::from_rows(&rows, [inputs, outputs], bits, DType::F32, device);
            assert_eq!(weight.bits(), bits as usize);
            assert_eq!(weight.dims(), [inputs, outputs]);
            let largest = ((1 << (bits - 1)) - 1) as f32;
            let values = weight.dequantize().into_data().try_into_vec::<f32>().unwrap();
            for (block, (original, restored)) in rows.chunks(BLOCK).zip(values.chunks(BLOCK)).enumerate() {
                let scale = original.iter().fold(0f32, |m, v| m.max(v.abs())) / largest;
                for (o, r) in original.iter().zip(restored) {
                    let expected = if scale > 0.0 { (o / scale).round() * scale } else { 0.0 };
                    assert!((r - expected).abs() <= 1e-5, "{bits}-bit block {block}: {r} vs {expected}");
                }
            }
        }
    }
}
