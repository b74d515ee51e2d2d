//! A BERT model loaded into candle-transformers through tensorlift, and the same model
//! loaded by candle's own `VarBuilder::from_mmaped_safetensors`: the two must give the same
//! outputs, bit for bit.
//!
//! ```text
//! python3 examples/candle-bert/make_model.py /tmp/bert     # a small BERT, written by the reference writer
//! cargo run -p candle-bert -- /tmp/bert
//! ```
//!
//! On a GPU, built with candle's CUDA backend (`--no-default-features --features cuda`, see
//! docs/CANDLE.md), `candle-bert /tmp/bert --device cuda:0` loads both models onto the GPU:
//! tensorlift straight into candle's device memory.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

/// What one comparison found.
#[derive(Debug)]
pub struct Comparison {
    /// Output shape.
    pub shape: Vec<usize>,
    /// The largest difference between the two models' outputs.
    pub max_abs_diff: f32,
    /// How tensorlift handed the tensors to candle.
    pub handover: tensorlift::candle::Handover,
    /// tensorlift's load, in seconds.
    pub tensorlift_secs: f64,
    /// The model built from tensorlift's tensors (`BertModel::load`, the load included), in
    /// seconds.
    pub tensorlift_model_secs: f64,
    /// The model built by candle's own loader (the mapping and `BertModel::load`), in seconds.
    pub candle_model_secs: f64,
}

/// Token ids and type ids for a batch of two short sequences.
fn inputs(vocab: usize, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 8), device)?;
    let types = ids.zeros_like()?;
    Ok((ids, types))
}

/// Loads the model in `dir` (`config.json`, `model.safetensors`) both ways on the host and
/// runs both.
pub fn compare(dir: &Path) -> anyhow::Result<Comparison> {
    compare_on(dir, &Device::Cpu)
}

/// [`compare`] on candle's `device`.
pub fn compare_on(dir: &Path, device: &Device) -> anyhow::Result<Comparison> {
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).context("reading config.json")?)?;
    let (ids, types) = inputs(config.vocab_size, device)?;

    // tensorlift: converted to F32 as it lands, into memory candle then owns (on the host, or
    // with the `cuda` feature on candle's GPU).
    let t = Instant::now();
    let builder = tensorlift::Loader::builder().convert_to(tensorlift::Dtype::F32);
    let loaded = tensorlift::candle::load_onto(builder, dir, device)?;
    let handover = loaded.handover();
    let tensorlift_secs = loaded.stats().wall.as_secs_f64();
    let ours = BertModel::load(loaded.into_var_builder(DType::F32, device.clone()), &config)?;
    device.synchronize()?;
    let tensorlift_model_secs = t.elapsed().as_secs_f64();
    let a = ours.forward(&ids, &types, None)?;

    // candle's own loader, on the same file.
    let t = Instant::now();
    let weights = [dir.join("model.safetensors")];
    // SAFETY: the file is not modified while the model is loaded from its mapping.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, device)? };
    let theirs = BertModel::load(vb, &config)?;
    device.synchronize()?;
    let candle_model_secs = t.elapsed().as_secs_f64();
    let b = theirs.forward(&ids, &types, None)?;

    let max_abs_diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(Comparison {
        shape: a.dims().to_vec(),
        max_abs_diff,
        handover,
        tensorlift_secs,
        tensorlift_model_secs,
        candle_model_secs,
    })
}
