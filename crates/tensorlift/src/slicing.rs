//! Loading parts of tensors: per-tensor slices, and the tensor-parallel helper [`Sharding`].
//!
//! A slice is applied to the plan, before a byte is read: a slice of the first dimension
//! reads only its rows (one contiguous read), a slice of an inner dimension reads the rows
//! that cover it and gathers its runs (on the host by copying; on a CUDA device with 2D
//! copies straight from the pinned staging chunk). [`LoadStats::bytes_read`] against
//! [`LoadStats::checkpoint_bytes`] shows what was saved.
//!
//! ```no_run
//! use tensorlift::{Loader, Sharding, Split};
//! # fn main() -> Result<(), tensorlift::LoadError> {
//! // Rank 1 of 4, with the rules vLLM and Megatron-LM use for a Llama model.
//! let loader = Loader::builder().shard(Sharding::llama(1, 4, 8)?).build()?;
//! let model = loader.load_blocking("models/llama")?;
//! let q = model.get("model.layers.0.self_attn.q_proj.weight").unwrap();
//! assert_eq!(q.shape()[0] * 4, 4096);
//! # Ok(()) }
//! ```
//!
//! [`LoadStats::bytes_read`]: crate::LoadStats::bytes_read
//! [`LoadStats::checkpoint_bytes`]: crate::LoadStats::checkpoint_bytes

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobMatcher};
pub use tensorlift_format::TensorSlice;

use crate::LoadError;

/// Chooses, for each tensor of a load, the part of it to load.
pub trait SliceRule: Send + Sync {
    /// The slice of tensor `name` (whose stored shape is `shape`) to load: `Ok(None)` for
    /// all of it, `Err` (a sentence) to refuse the load.
    fn slice(&self, name: &str, shape: &[usize]) -> Result<Option<TensorSlice>, String>;
}

impl<F> SliceRule for F
where
    F: Fn(&str, &[usize]) -> Result<Option<TensorSlice>, String> + Send + Sync,
{
    fn slice(&self, name: &str, shape: &[usize]) -> Result<Option<TensorSlice>, String> {
        self(name, shape)
    }
}

/// How a tensor is split across tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Split {
    /// Column-parallel (a linear layer's output features, a vocabulary-parallel
    /// embedding): dimension 0 of every matched tensor, bias included.
    Column,
    /// Row-parallel (a linear layer's input features): the last dimension of a matrix;
    /// one-dimensional tensors (the bias) are replicated.
    Row,
    /// Every rank loads the whole tensor.
    Replicated,
    /// This dimension of every matched tensor.
    Dim(usize),
    /// A vocabulary-parallel embedding or LM head, as vLLM splits it: the vocabulary is
    /// padded to a multiple of 64, each rank takes an equal part of the padded rows, and
    /// keeps those that exist (the last rank may get fewer rows than the others, or none;
    /// the server pads them, as vLLM's `VocabParallelEmbedding` does).
    Vocab,
}

/// The part of a checkpoint that one rank of a tensor-parallel group loads, from rules
/// that map tensor-name globs to a [`Split`]. The first rule that matches a name decides;
/// tensors no rule matches are replicated.
///
/// Rank `r` of `world_size` gets indices `r * n / world_size .. (r + 1) * n / world_size`
/// of a split dimension of length `n`. A dimension that does not divide evenly is an error
/// naming the tensor, as in vLLM's and Megatron-LM's linear layers (both assert
/// divisibility); no rank silently gets a different share. [`Split::Vocab`] pads first, as
/// vLLM's vocabulary-parallel layers do.
#[derive(Clone)]
pub struct Sharding {
    rank: usize,
    world_size: usize,
    rules: Vec<(String, GlobMatcher, Split)>,
}

impl std::fmt::Debug for Sharding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rules: Vec<(&str, Split)> = self.rules.iter().map(|(p, _, s)| (p.as_str(), *s)).collect();
        f.debug_struct("Sharding")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("rules", &rules)
            .finish()
    }
}

impl Sharding {
    /// Rank `rank` of `world_size`, with no rules yet (everything replicated).
    pub fn new(rank: usize, world_size: usize) -> Result<Sharding, LoadError> {
        if world_size == 0 || rank >= world_size {
            return Err(LoadError::Unsupported(format!("rank {rank} of a tensor-parallel group of {world_size}")));
        }
        Ok(Sharding { rank, world_size, rules: Vec::new() })
    }

    /// Adds a rule: tensors whose name matches the glob `pattern` are split by `split`.
    pub fn rule(mut self, pattern: &str, split: Split) -> Result<Sharding, LoadError> {
        let glob = Glob::new(pattern)
            .map_err(|e| LoadError::InvalidFilter { pattern: pattern.to_owned(), message: e.kind().to_string() })?;
        self.rules.push((pattern.to_owned(), glob.compile_matcher(), split));
        Ok(self)
    }

    /// The rules vLLM applies to unquantized Llama-family checkpoints (Llama, Mistral,
    /// Qwen2), for a model with `num_key_value_heads` key/value heads: attention q/k/v and
    /// MLP gate/up weights and biases are column-parallel, attention output and MLP down
    /// weights row-parallel (their biases replicated), the token embedding and the LM head
    /// vocabulary-parallel ([`Split::Vocab`]); everything else (norms, and tensors of other
    /// layouts: quantized `qweight`s, scales, LoRA adapters) is replicated. A float8
    /// checkpoint's `weight`s are split like any other, but their `weight_scale` and
    /// `weight_scale_inv` tensors are whole on every rank: a server takes its own part of
    /// per-channel and block scales, or builds its sharding with [`Sharding::new`] and
    /// rules of its own for the scales ahead of these (the first rule that matches decides).
    /// Fewer key/value heads than ranks, or a number the ranks do not divide, is refused
    /// (vLLM replicates such heads across ranks; that layout is not built here).
    pub fn llama(rank: usize, world_size: usize, num_key_value_heads: usize) -> Result<Sharding, LoadError> {
        let mut s = Sharding::new(rank, world_size)?;
        if num_key_value_heads < world_size || num_key_value_heads % world_size != 0 {
            return Err(LoadError::Unsupported(format!(
                "{num_key_value_heads} key/value heads over {world_size} ranks (each rank needs whole heads of its own)"
            )));
        }
        for (pattern, split) in [
            ("*.self_attn.{q,k,v}_proj.{weight,bias}", Split::Column),
            ("*.mlp.{gate,up}_proj.{weight,bias}", Split::Column),
            ("*.self_attn.o_proj.weight", Split::Row),
            ("*.mlp.down_proj.weight", Split::Row),
            ("*embed_tokens.weight", Split::Vocab),
            ("lm_head.weight", Split::Vocab),
        ] {
            s = s.rule(pattern, split)?;
        }
        Ok(s)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The split the rules give tensor `name`.
    pub fn split_of(&self, name: &str) -> Split {
        self.rules.iter().find(|(_, m, _)| m.is_match(name)).map_or(Split::Replicated, |r| r.2)
    }
}

impl SliceRule for Sharding {
    fn slice(&self, name: &str, shape: &[usize]) -> Result<Option<TensorSlice>, String> {
        let dim = match (self.split_of(name), shape.len()) {
            // A scalar has nothing to split, but only a rule that names no dimension may
            // say so: `Dim(d)` of one is no dimension of it.
            (Split::Dim(d), 0) => return Err(format!("a scalar has no dimension {d} to split")),
            (Split::Replicated, _) | (_, 0) | (Split::Row, 1) => return Ok(None),
            (Split::Vocab, _) => {
                // vLLM pads the vocabulary to a multiple of 64 and splits the padded rows.
                let Some(padded) = shape[0].checked_next_multiple_of(64) else {
                    return Err(format!("a vocabulary of {} rows is past any that can be padded", shape[0]));
                };
                if padded % self.world_size != 0 {
                    return Err(format!(
                        "the padded vocabulary ({padded}) does not divide evenly into {} ranks",
                        self.world_size
                    ));
                }
                let per = padded / self.world_size;
                let start = (self.rank * per).min(shape[0]);
                let end = ((self.rank + 1) * per).min(shape[0]);
                return Ok(Some(TensorSlice::rows(start..end)));
            }
            (Split::Column, _) => 0,
            (Split::Row, n) => n - 1,
            (Split::Dim(d), n) if d < n => d,
            (Split::Dim(d), n) => {
                return Err(format!("the sharding rules split dimension {d} of a {n}-dimensional tensor"));
            }
        };
        let n = shape[dim];
        if n % self.world_size != 0 {
            return Err(format!(
                "dimension {dim} ({n}) does not divide evenly into {} ranks (vLLM and Megatron-LM require \
                 tensor-parallel splits to be even)",
                self.world_size
            ));
        }
        let share = n / self.world_size;
        let slice = TensorSlice::along(shape, dim, self.rank * share..(self.rank + 1) * share);
        slice.map(Some).map_err(|e| e.to_string())
    }
}

/// Narrows each tensor of `plan` to its slice in `chosen` (by index; `None`: whole).
pub(crate) fn apply_chosen(
    plan: &mut tensorlift_format::LoadPlan,
    chosen: &[Option<TensorSlice>],
) -> Result<(), LoadError> {
    let file = crate::error::plan_file(plan);
    let mut i = 0;
    plan.slice_with(
        |_| {
            i += 1;
            Ok(chosen.get(i - 1).cloned().flatten())
        },
        |t, e| LoadError::Slice { file: file.clone(), tensor: t.name.clone(), message: e.to_string() },
    )
}

/// The slices a loader applies: exact names first, then the rule.
#[derive(Clone, Default)]
pub(crate) struct Slices {
    pub named: HashMap<String, TensorSlice>,
    pub rule: Option<Arc<dyn SliceRule>>,
}

impl Slices {
    pub fn is_empty(&self) -> bool {
        self.named.is_empty() && self.rule.is_none()
    }

    /// Narrows every tensor of `plan` that a slice applies to.
    pub fn apply(&self, plan: &mut tensorlift_io::Checkpoint) -> Result<(), LoadError> {
        if self.is_empty() {
            return Ok(());
        }
        let chosen = self.choose(plan)?;
        apply_chosen(plan, &chosen)
    }

    /// The slice of each tensor of `plan` (`None`: all of it): by its exact name, else as
    /// the rule says. A slice asked for by name of a tensor the plan does not have is an
    /// error, as is a rule's refusal.
    pub fn choose(&self, plan: &tensorlift_format::LoadPlan) -> Result<Vec<Option<TensorSlice>>, LoadError> {
        let file = crate::error::plan_file(plan);
        let fail =
            |tensor: &str, message: String| LoadError::Slice { file: file.clone(), tensor: tensor.to_owned(), message };
        let mut unused: Vec<&str> = self.named.keys().map(String::as_str).collect();
        let chosen = plan
            .tensors()
            .iter()
            .map(|t| match self.named.get(&t.name) {
                Some(s) => {
                    unused.retain(|n| *n != t.name);
                    Ok(Some(s.clone()))
                }
                None => match &self.rule {
                    Some(r) => r.slice(&t.name, &t.shape).map_err(|m| fail(&t.name, m)),
                    None => Ok(None),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A slice asked for by name of a tensor the load does not have is a mistake to say.
        match unused.first() {
            Some(n) => Err(fail(n, "no such tensor in the load".into())),
            None => Ok(chosen),
        }
    }
}
