//! The CPU backend: collectives over the TCP links from rendezvous, with libtorch doing the arithmetic so
//! every dtype reduces exactly as torch would.
//!
//! Data flows through rank 0 (a star): correct for any world size and across hosts. A ring or shared-
//! memory path for large tensors on one host can replace the exchanges without changing callers.

use super::rendezvous::Links;
use super::wire;
use super::{Backend, ReduceOp};
use crate::{Error, Result};
use tch::{Device, Tensor};

pub(crate) struct CpuBackend {
    links: Links,
    /// Shared memory with the other ranks, when they are all on this host.
    pub(crate) arena: Option<super::shm::Arena>,
}

impl CpuBackend {
    pub(crate) fn new(links: Links) -> Self {
        CpuBackend { links, arena: None }
    }

    pub(crate) fn rank(&self) -> usize {
        self.links.rank
    }

    pub(crate) fn world_size(&self) -> usize {
        self.links.world_size
    }

    fn is_root(&self) -> bool {
        self.links.rank == 0
    }

    /// Sends an abort to every peer and returns the error, so no rank is left waiting. A timeout is not
    /// sent yet: the group first asks the census which ranks never arrived, then tells the peers
    /// ([`CpuBackend::tell_peers`]).
    fn abort(&mut self, err: Error) -> Error {
        if !matches!(err, Error::CollectiveTimeout { .. }) {
            self.tell_peers(&err);
        }
        err
    }

    /// Sends `err` to every peer as an abort (best effort: a peer may be gone or stuck).
    pub(crate) fn tell_peers(&mut self, err: &Error) {
        let message = format!("{err}");
        for stream in self.links.peers.iter_mut().flatten() {
            wire::send_abort(stream, &message);
        }
    }

    fn root_stream(&mut self) -> &mut std::net::TcpStream {
        self.links.peers[0]
            .as_mut()
            .unwrap_or_else(|| unreachable!("a non-root rank always holds its link to rank 0"))
    }
}

/// Runs `f` on a CPU copy of a GPU tensor and copies the result back; CPU tensors are used directly.
/// This keeps GPU jobs working on the TCP backend (slowly) until NCCL takes over their tensors.
pub(super) fn on_cpu(
    t: &mut Tensor,
    op: &'static str,
    f: impl FnOnce(&mut Tensor) -> Result<()>,
) -> Result<()> {
    if t.device() == Device::Cpu {
        return f(t);
    }
    let mut staged = t.to_device(Device::Cpu);
    f(&mut staged)?;
    t.f_copy_(&staged)
        .map(drop)
        .map_err(|source| Error::torch(op, source))
}

/// The bytes of a tensor, in row-major order.
pub(crate) fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, numel);
    bytes
}

pub(super) fn reduce_into(acc: &mut Tensor, other: &Tensor, op: ReduceOp) -> Result<()> {
    let torch = |source| Error::torch("all_reduce", source);
    match op {
        ReduceOp::Sum | ReduceOp::Mean => acc.f_add_(other).map(drop),
        ReduceOp::Product => acc.f_mul_(other).map(drop),
        ReduceOp::Max => acc.f_maximum(other).and_then(|m| acc.f_copy_(&m)),
        ReduceOp::Min => acc.f_minimum(other).and_then(|m| acc.f_copy_(&m)),
    }
    .map_err(torch)
}

impl Backend for CpuBackend {
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        on_cpu(t, "all_reduce", |t| {
            if self.use_shm(t.numel() * t.kind().elt_size_in_bytes()) && t.is_contiguous() {
                if op == ReduceOp::Mean && !crate::ops::is_float(t.kind()) {
                    return Err(Error::Collective {
                        op: "all_reduce",
                        detail: format!("a mean needs a floating-point tensor, got {:?}", t.kind()),
                    });
                }
                self.all_reduce_shm(t, op)
            } else {
                self.all_reduce_cpu(t, op)
            }
        })
    }

    fn broadcast(&mut self, t: &mut Tensor, src: usize) -> Result<()> {
        on_cpu(t, "broadcast", |t| {
            if self.use_shm(t.numel() * t.kind().elt_size_in_bytes()) && t.is_contiguous() {
                self.broadcast_shm(t, src)
            } else {
                self.broadcast_cpu(t, src)
            }
        })
    }

    fn all_gather_cat(&mut self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        let device = t.device();
        let cpu = t.to_device(Device::Cpu);
        if self.use_shm(cpu.numel() * cpu.kind().elt_size_in_bytes()) {
            return self
                .all_gather_shm(&cpu)?
                .f_to_device(device)
                .map_err(|e| Error::torch(OP, e));
        }
        let parts = self.all_gather_bytes(&tensor_bytes(&cpu))?;
        let own = parts[self.links.rank].len();
        if let Some((rank, p)) = parts.iter().enumerate().find(|(_, p)| p.len() != own) {
            // Every rank sees every length, so every rank reports the same mismatch: nobody hangs.
            return Err(Error::Collective {
                op: OP,
                detail: format!(
                    "rank {rank} passed {} bytes but rank {} passed {own}; every rank must gather the same shape                      (pad_across_processes first)",
                    p.len(),
                    self.links.rank
                ),
            });
        }
        let (size, kind) = (cpu.size(), cpu.kind());
        let tensors: Vec<Tensor> = parts
            .iter()
            .map(|p| Tensor::from_data_size(p, &size, kind))
            .collect();
        Tensor::f_cat(&tensors, 0)
            .and_then(|c| c.f_to_device(device))
            .map_err(|source| Error::torch(OP, source))
    }

    fn reduce_scatter(&mut self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let mut full = t.copy();
        self.all_reduce(&mut full, op)?;
        let rows = t.size()[0] / self.links.world_size as i64;
        full.f_narrow(0, self.links.rank as i64 * rows, rows)
            .map(|s| s.copy())
            .map_err(|source| Error::torch("reduce_scatter", source))
    }
}

impl CpuBackend {
    fn all_reduce_cpu(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        if self.links.world_size == 1 {
            return Ok(());
        }
        let size = t.size();
        let kind = t.kind();
        if op == ReduceOp::Mean && !crate::ops::is_float(kind) {
            return Err(Error::Collective {
                op: OP,
                detail: format!(
                    "a mean needs a floating-point tensor, got {kind:?}; use Sum and divide"
                ),
            });
        }
        if self.is_root() {
            let mut acc = t.contiguous().copy();
            let expected = acc.numel() * kind.elt_size_in_bytes();
            for peer in 1..self.links.world_size {
                let stream = self.links.peers[peer].as_mut().ok_or(Error::Collective {
                    op: OP,
                    detail: format!("no link to rank {peer}"),
                })?;
                let bytes = match wire::recv(stream, peer, OP) {
                    Ok(b) => b,
                    Err(e) => return Err(self.abort(e)),
                };
                if bytes.len() != expected {
                    let e = Error::Collective {
                        op: OP,
                        detail: format!(
                            "rank {peer} sent {} bytes but rank 0 holds a {kind:?} tensor of shape {size:?} ({expected} bytes); \
                             every rank must pass the same shape and dtype",
                            bytes.len()
                        ),
                    };
                    return Err(self.abort(e));
                }
                let other = Tensor::from_data_size(&bytes, &size, kind);
                if let Err(e) = reduce_into(&mut acc, &other, op) {
                    return Err(self.abort(e));
                }
            }
            let result = tensor_bytes(&acc);
            for peer in 1..self.links.world_size {
                if let Some(stream) = self.links.peers[peer].as_mut() {
                    wire::send(stream, &result, peer, OP)?;
                }
            }
            t.f_copy_(&acc).map_err(|source| Error::torch(OP, source))?;
        } else {
            let bytes = tensor_bytes(t);
            let stream = self.root_stream();
            wire::send(stream, &bytes, 0, OP)?;
            let mut out = vec![0u8; bytes.len()];
            wire::recv_into(stream, &mut out, 0, OP)?;
            let reduced = Tensor::from_data_size(&out, &size, kind);
            t.f_copy_(&reduced)
                .map_err(|source| Error::torch(OP, source))?;
        }
        if op == ReduceOp::Mean {
            let n = self.links.world_size as f64;
            t.f_div_scalar_(n)
                .map(drop)
                .map_err(|source| Error::torch(OP, source))?;
        }
        Ok(())
    }

    fn broadcast_cpu(&mut self, t: &mut Tensor, src: usize) -> Result<()> {
        const OP: &str = "broadcast";
        let world = self.links.world_size;
        if src >= world {
            return Err(Error::Collective {
                op: OP,
                detail: format!("source rank {src} is not in a group of {world}"),
            });
        }
        if world == 1 {
            return Ok(());
        }
        let size = t.size();
        let kind = t.kind();
        let rank = self.links.rank;
        // Route through rank 0: the source sends to 0 (unless it is 0), then 0 sends to everyone else.
        let mut payload = if rank == src {
            Some(tensor_bytes(t))
        } else {
            None
        };
        if self.is_root() {
            if src != 0 {
                let stream = self.links.peers[src].as_mut().ok_or(Error::Collective {
                    op: OP,
                    detail: format!("no link to rank {src}"),
                })?;
                match wire::recv(stream, src, OP) {
                    Ok(b) => payload = Some(b),
                    Err(e) => return Err(self.abort(e)),
                }
            }
            let bytes = payload.take().unwrap_or_default();
            for peer in (1..world).filter(|p| *p != src) {
                if let Some(stream) = self.links.peers[peer].as_mut() {
                    wire::send(stream, &bytes, peer, OP)?;
                }
            }
            payload = Some(bytes);
        } else if rank == src {
            let bytes = payload.clone().unwrap_or_default();
            wire::send(self.root_stream(), &bytes, 0, OP)?;
        } else {
            let expected = t.numel() * kind.elt_size_in_bytes();
            let mut out = vec![0u8; expected];
            wire::recv_into(self.root_stream(), &mut out, 0, OP)?;
            payload = Some(out);
        }
        if rank != src {
            let bytes = payload.unwrap_or_default();
            let expected = t.numel() * kind.elt_size_in_bytes();
            if bytes.len() != expected {
                return Err(Error::Collective {
                    op: OP,
                    detail: format!(
                        "rank {src} broadcast {} bytes but rank {rank} expects shape {size:?} of {kind:?} ({expected} bytes)",
                        bytes.len()
                    ),
                });
            }
            let value = Tensor::from_data_size(&bytes, &size, kind);
            t.f_copy_(&value)
                .map_err(|source| Error::torch(OP, source))?;
        }
        Ok(())
    }

    /// Every rank's bytes in rank order, on every rank (objects, barriers, metadata).
    pub(crate) fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        const OP: &str = "all_gather";
        let world = self.links.world_size;
        if world == 1 {
            return Ok(vec![bytes.to_vec()]);
        }
        if self.is_root() {
            let mut all = vec![bytes.to_vec()];
            for peer in 1..world {
                let stream = self.links.peers[peer].as_mut().ok_or(Error::Collective {
                    op: OP,
                    detail: format!("no link to rank {peer}"),
                })?;
                match wire::recv(stream, peer, OP) {
                    Ok(b) => all.push(b),
                    Err(e) => return Err(self.abort(e)),
                }
            }
            let packed = pack(&all);
            for peer in 1..world {
                if let Some(stream) = self.links.peers[peer].as_mut() {
                    wire::send(stream, &packed, peer, OP)?;
                }
            }
            Ok(all)
        } else {
            let stream = self.root_stream();
            wire::send(stream, bytes, 0, OP)?;
            let packed = wire::recv(stream, 0, OP)?;
            unpack(&packed, world).ok_or(Error::Collective {
                op: OP,
                detail: "rank 0 sent a malformed gather result".into(),
            })
        }
    }
}

fn pack(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn unpack(mut data: &[u8], n: usize) -> Option<Vec<Vec<u8>>> {
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        let len = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
        parts.push(data.get(8..8 + len)?.to_vec());
        data = &data[8 + len..];
    }
    data.is_empty().then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip() {
        let parts = vec![vec![1, 2, 3], vec![], vec![9; 1000]];
        assert_eq!(unpack(&pack(&parts), 3).unwrap(), parts);
        assert!(unpack(&pack(&parts), 2).is_none());
        assert!(unpack(&[1, 2], 1).is_none());
    }
}
