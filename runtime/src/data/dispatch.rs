//! Accelerate's `DataLoaderDispatcher`: only process 0 reads the data. Each step it takes `P` batches (one
//! with split_batches), concatenates them, sends their [`Layout`] and then their tensors to every process,
//! and each process keeps its slice. The default for iterable datasets, as in Accelerate: a stream is read
//! once, by one process, instead of `P` times.

use super::loader::ShardOptions;
use crate::{
    Error, GradientStateHandle, Group, Layout, Nested, RNGType, Result, concatenate,
    send_to_device, slice_tensors, tensors_of,
};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// How a prepared loader works with the other processes, beyond taking its shard.
#[derive(Default)]
pub(crate) enum Coordination {
    /// Nothing to exchange.
    #[default]
    Alone,
    /// Process 0 reads the data and dispatches its batches through the group.
    Dispatch(Group),
    /// These generators are copied from process 0 each time an epoch starts (`rng_types`).
    SyncRng(Group, Vec<RNGType>),
}

impl Coordination {
    /// The group batches are dispatched through, if they are.
    pub(crate) fn dispatch_group(&self) -> Option<&Group> {
        match self {
            Coordination::Dispatch(group) => Some(group),
            _ => None,
        }
    }

    /// What happens on every process when an epoch of a (not dispatching) loader starts.
    pub(crate) fn start_epoch(&self) -> Result<()> {
        if let Coordination::SyncRng(group, types) = self {
            crate::random::synchronize_rng_types(&mut group.lock(), types)?;
        }
        Ok(())
    }
}

/// What process 0 tells the others before each batch.
#[derive(Serialize, Deserialize)]
enum Message {
    /// A batch of this layout follows; `last` when process 0's loader has no more.
    Batch { layout: Layout, last: bool },
    /// The loader is exhausted.
    Stop,
    /// Process 0's loader failed: every process stops with this message instead of waiting for data.
    Failed(String),
}

fn dispatch_error(detail: String) -> Error {
    Error::Collective {
        op: "dispatch",
        detail,
    }
}

/// A value of `layout` holding `tensors` (in visiting order).
fn assemble<B: Nested>(layout: &Layout, tensors: Vec<Tensor>) -> Result<B> {
    let mut tensors = tensors.into_iter();
    B::from_layout(layout, &mut |_, _| {
        tensors
            .next()
            .ok_or_else(|| dispatch_error("a batch's layout lists more tensors than it has".into()))
    })
}

/// One process's batches from a dispatching loader; every process must iterate it in step (each batch is
/// a collective).
pub(crate) struct Dispatch<I, B> {
    /// Process 0's batches (none elsewhere).
    source: Option<I>,
    group: Group,
    options: ShardOptions,
    drop_last: bool,
    gradient_state: GradientStateHandle,
    /// Batches to read and drop first (`skip_first_batches`).
    skip: usize,
    /// The first `P` samples of the epoch, to complete a short last batch (unless drop_last).
    first: Option<B>,
    /// The batch fetched ahead to learn whether the current one is the last.
    ahead: Option<(B, bool)>,
    /// No fetch is left (process 0 said so).
    exhausted: bool,
    done: bool,
}

impl<I: Iterator<Item = Result<B>>, B: Nested> Dispatch<I, B> {
    pub(crate) fn new(
        source: Option<I>,
        group: Group,
        options: ShardOptions,
        drop_last: bool,
        gradient_state: GradientStateHandle,
        skip: usize,
    ) -> Self {
        {
            let mut g = gradient_state.lock();
            g.in_dataloader = true;
            g.end_of_dataloader = false;
            g.remainder = -1;
        }
        Dispatch {
            source,
            group,
            options,
            drop_last,
            gradient_state,
            skip,
            first: None,
            ahead: None,
            exhausted: false,
            done: false,
        }
    }

    /// Process 0: the next batch to send (`P` batches concatenated, or one with split_batches), on this
    /// device, and whether the loader is exhausted after it.
    fn read(&mut self) -> Result<Option<(B, bool)>> {
        let p = self.options.num_processes;
        let Some(source) = self.source.as_mut() else {
            return Ok(None);
        };
        let (batch, last) = if self.options.split_batches {
            match source.next() {
                Some(b) => (b?, false),
                None => return Ok(None),
            }
        } else {
            let mut got = Vec::with_capacity(p);
            while got.len() < p {
                match source.next() {
                    Some(b) => got.push(b?),
                    None => break,
                }
            }
            let last = got.len() < p;
            if got.is_empty() || (last && self.drop_last) {
                return Ok(None);
            }
            let batch = concatenate(got, 0).map_err(|e| {
                dispatch_error(format!(
                    "batches of different structure or size cannot be dispatched ({e}); use \
                     dispatch_batches=false to have each process read its own"
                ))
            })?;
            (batch, last)
        };
        let batch = send_to_device(batch, self.options.device, self.options.non_blocking, &[])?;
        Ok(Some((batch, last)))
    }

    /// One exchange, on every process: process 0's next batch, everywhere.
    fn fetch(&mut self) -> Result<Option<(B, bool)>> {
        if self.exhausted {
            return Ok(None);
        }
        let is_sender = self.options.process_index == 0;
        let (message, mine) = if is_sender {
            match self.read().and_then(|r| match r {
                Some((b, last)) => b.layout().map(|layout| Some((b, layout, last))),
                None => Ok(None),
            }) {
                Ok(Some((b, layout, last))) => (Message::Batch { layout, last }, Some(b)),
                Ok(None) => (Message::Stop, None),
                Err(e) => (Message::Failed(e.to_string()), None),
            }
        } else {
            (Message::Stop, None)
        };
        let mut group = self.group.lock();
        let mut messages = vec![message];
        group.broadcast_object_list(&mut messages, 0)?;
        match messages.pop() {
            Some(Message::Batch { layout, last }) => {
                self.exhausted = last;
                let device = self.options.device;
                let batch = match mine {
                    Some(b) => b,
                    None => B::from_layout(&layout, &mut |shape, kind| {
                        Tensor::f_empty(shape, (kind, device))
                            .map_err(|e| Error::torch("dispatch", e))
                    })?,
                };
                // In place: these tensors are fresh on every process (process 0's concatenated or
                // copied to the device, the others' just made), so `broadcast_data`'s copy is not needed.
                let batch = crate::map_tensors(batch, |t| {
                    let mut t = t.f_contiguous().map_err(|e| Error::torch("dispatch", e))?;
                    group.broadcast(&mut t, 0)?;
                    Ok(t)
                })?;
                Ok(Some((batch, last)))
            }
            Some(Message::Failed(why)) => {
                self.exhausted = true;
                Err(dispatch_error(format!(
                    "process 0's data loader failed: {why}"
                )))
            }
            Some(Message::Stop) | None => {
                self.exhausted = true;
                Ok(None)
            }
        }
    }

    /// This process's slice of the next dispatched batch (Accelerate's `__iter__` body).
    fn step(&mut self) -> Result<Option<B>> {
        let current = match self.ahead.take() {
            Some(b) => Some(b),
            None => self.fetch()?,
        };
        let Some((batch, last)) = current else {
            return Ok(None);
        };
        let p = self.options.num_processes as i64;
        let observed = tensors_of(&batch)
            .first()
            .and_then(|t| t.size().first().copied())
            .ok_or_else(|| {
                dispatch_error("a dispatched batch needs a tensor with a batch dimension".into())
            })?;
        if !self.drop_last && self.first.is_none() {
            let layout = batch.layout()?;
            let heads = tensors_of(&batch)
                .into_iter()
                .map(|t| {
                    t.f_slice(0, 0, p, 1)
                        .map_err(|e| Error::torch("dispatch", e))
                })
                .collect::<Result<Vec<_>>>()?;
            self.first = Some(assemble(&layout, heads)?);
        }
        let mut per_process = observed / p;
        let stop = last || {
            self.ahead = self.fetch()?;
            self.ahead.is_none()
        };
        let mut batch = batch;
        if stop && !self.drop_last && observed % p != 0 {
            // Complete the short last batch with the epoch's first samples, as Accelerate does; the
            // remainder below lets gather_for_metrics drop them again.
            if let Some(first) = self.first.take() {
                batch = concatenate(vec![batch, first], 0)?;
                per_process += 1;
            }
        }
        let rank = self.options.process_index as i64;
        let mine = slice_tensors(batch, rank * per_process..(rank + 1) * per_process)?;
        if stop {
            let mut g = self.gradient_state.lock();
            g.end_of_dataloader = true;
            g.remainder = observed;
        }
        Ok(Some(mine))
    }
}

impl<I: Iterator<Item = Result<B>>, B: Nested> Iterator for Dispatch<I, B> {
    type Item = Result<B>;

    fn next(&mut self) -> Option<Result<B>> {
        while !self.done {
            match self.step() {
                Ok(Some(_)) if self.skip > 0 => self.skip -= 1,
                Ok(Some(b)) => return Some(Ok(b)),
                Ok(None) => self.done = true,
                Err(e) => {
                    self.done = true;
                    self.gradient_state.lock().in_dataloader = false;
                    return Some(Err(e));
                }
            }
        }
        self.gradient_state.lock().in_dataloader = false;
        None
    }
}
