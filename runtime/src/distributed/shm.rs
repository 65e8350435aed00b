//! Shared memory for ranks on one host: large CPU collectives copy through a `/dev/shm` segment that
//! every rank maps, and each rank reduces its own share, instead of pushing every byte through rank 0
//! over loopback TCP (0.23 GB/s bus bandwidth at 64 MiB on a 2-core machine before this).
//!
//! The segment has one slot per rank. Synchronisation uses the TCP links (a barrier is one round trip),
//! so a rank that dies is still noticed by the others as a closed connection, never as a spin forever.
//! It is created only when every rank can map it (same host), reserved with `posix_fallocate` so a small
//! `/dev/shm` fails at set-up rather than with SIGBUS later, and unlinked as soon as all ranks hold it.

use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Bytes of one rank's slot; larger tensors go through in chunks. `HASTEN_SHM_SLOT_MB` overrides it.
const DEFAULT_SLOT_BYTES: usize = 32 << 20;

/// Collectives on CPU tensors of at least this many bytes use shared memory when it is available.
pub(crate) const SHM_MIN_BYTES: usize = 256 * 1024;

pub(crate) struct Arena {
    base: *mut u8,
    len: usize,
    pub(crate) slot_bytes: usize,
}

// SAFETY: the mapping is only touched through &mut self of the owning backend, one collective at a time.
unsafe impl Send for Arena {}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, once; no view of it outlives the Arena (views are made
        // per collective and dropped before it ends).
        let _ = unsafe { rustix::mm::munmap(self.base.cast(), self.len) };
    }
}

/// The largest slot `HASTEN_SHM_SLOT_MB` may ask for (MiB): every rank's slot lives in /dev/shm at once.
const MAX_SLOT_MB: usize = 4096;

/// The slot size to use, from `HASTEN_SHM_SLOT_MB` (0 disables shared memory; at most 4096 MiB).
pub(crate) fn slot_bytes_from_env() -> Result<usize> {
    match std::env::var("HASTEN_SHM_SLOT_MB") {
        Err(_) => Ok(DEFAULT_SLOT_BYTES),
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|mb| *mb <= MAX_SLOT_MB)
            .map(|mb| mb << 20)
            .ok_or_else(|| {
                hasten_core::Error::EnvParse {
                    var: "HASTEN_SHM_SLOT_MB".into(),
                    value: v,
                    expected: "a whole number of MiB from 0 (no shared memory) to 4096",
                }
                .into()
            }),
    }
}

/// Unlinks a segment's name when dropped (the mapping stays until every rank unmaps it).
struct Unlink(Option<String>);

impl Drop for Unlink {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            Arena::unlink(&name);
        }
    }
}

/// A name unique to this job on this host.
pub(crate) fn segment_name(port: u16) -> String {
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("/hasten-{port}-{pid}-{nanos}")
}

impl Arena {
    /// Creates (`create`) or opens the segment `name` of `world` slots and maps it.
    pub(crate) fn map(
        name: &str,
        world: usize,
        slot_bytes: usize,
        create: bool,
    ) -> std::result::Result<Self, String> {
        let len = world
            .checked_mul(slot_bytes)
            .ok_or_else(|| format!("{world} slots of {slot_bytes} bytes overflow"))?;
        use rustix::fs::{FallocateFlags, Mode, fallocate};
        use rustix::mm::{MapFlags, ProtFlags, mmap};
        use rustix::shm::{self, OFlags};
        let flags = if create {
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL
        } else {
            OFlags::RDWR
        };
        let fd = shm::open(name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| format!("shm_open {name}: {e}"))?;
        if create {
            if let Err(e) = fallocate(&fd, FallocateFlags::empty(), 0, len as u64) {
                let _ = shm::unlink(name);
                return Err(format!("reserving {len} bytes in /dev/shm: {e}"));
            }
        }
        // SAFETY: a new shared mapping of `len` bytes of a segment that size (reserved above, or by
        // the rank that created it before this one was told its name), at an address the kernel picks.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| format!("mmap: {e}"))?;
        Ok(Arena {
            base: base.cast(),
            len,
            slot_bytes,
        })
    }

    /// Removes the segment's name (the mapping lives on until every rank unmaps it).
    pub(crate) fn unlink(name: &str) {
        // Errors (already gone) do not matter.
        let _ = rustix::shm::unlink(name);
    }

    /// A 1-d tensor over `numel` elements of `kind` in `slot`, starting `offset` elements in.
    pub(crate) fn view(
        &self,
        slot: usize,
        offset: usize,
        numel: usize,
        kind: Kind,
    ) -> Result<Tensor> {
        let elt = kind.elt_size_in_bytes();
        let start = slot * self.slot_bytes + offset * elt;
        if start + numel * elt > self.len || offset * elt + numel * elt > self.slot_bytes {
            return Err(Error::Collective {
                op: "shared memory",
                detail: format!("a view of {numel} elements at {offset} does not fit slot {slot}"),
            });
        }
        // SAFETY: the range lies inside our mapping (checked above), which outlives every view: views
        // are used and dropped within one collective of the backend that owns the arena.
        unsafe {
            Tensor::f_from_blob(
                self.base.add(start),
                &[numel as i64],
                &[1],
                kind,
                Device::Cpu,
            )
        }
        .map_err(|e| Error::torch("shared memory view", e))
    }
}

use super::ReduceOp;
use super::cpu::CpuBackend;

pub(crate) fn hostname() -> Vec<u8> {
    rustix::system::uname().nodename().to_bytes().to_vec()
}

impl CpuBackend {
    /// Sets up shared memory when every rank is on this host; otherwise (or if anything fails on any
    /// rank) leaves the backend on TCP alone. Every rank takes part, and all end in the same state.
    pub(crate) fn setup_shared_memory(&mut self, port: u16) -> Result<()> {
        // Rank 0's slot size is everyone's: ranks whose HASTEN_SHM_SLOT_MB differ would otherwise lay
        // the segment out differently (wrong data) or map past its end (SIGBUS), and a rank that
        // disabled it would leave the others waiting in the next step.
        // Every rank offers [valid, slot size, hostname] before deciding anything, so that all of them
        // run the same collectives; rank 0's value decides, other ranks' values are not used.
        let mine = slot_bytes_from_env();
        let mut offer = vec![u8::from(mine.is_ok())];
        offer.extend_from_slice(&mine.as_ref().map_or(0, |s| *s).to_le_bytes());
        offer.extend_from_slice(&hostname());
        let offers = self.all_gather_bytes(&offer)?;
        let split = |o: &[u8]| -> (bool, usize, Vec<u8>) {
            let valid = o.first() == Some(&1);
            let size = o
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map_or(0, usize::from_le_bytes);
            (valid, size, o.get(9..).unwrap_or_default().to_vec())
        };
        let (valid0, slot_bytes, host0) = split(&offers[0]);
        if !valid0 {
            return Err(match mine {
                Err(own) if self.rank() == 0 => own,
                _ => Error::InvalidValue {
                    name: "HASTEN_SHM_SLOT_MB".into(),
                    detail: "rank 0's value is not a whole number of MiB from 0 to 4096 (rank 0's \
                             value is the one every rank uses)"
                        .into(),
                },
            });
        }
        let same_host = offers.iter().all(|o| {
            let (_, _, h) = split(o);
            !h.is_empty() && h == host0
        });
        if slot_bytes == 0 || !same_host {
            return Ok(());
        }
        let world = self.world_size();
        let name = segment_name(port);
        let created = if self.rank() == 0 {
            hasten_core::sweep_stale_shm_segments();
            Arena::map(&name, world, slot_bytes, true).ok()
        } else {
            None
        };
        // Rank 0 unlinks its segment once everyone has mapped it; on any earlier return too.
        let _unlink = Unlink((self.rank() == 0 && created.is_some()).then(|| name.clone()));
        let announce = match (&created, self.rank()) {
            (Some(_), 0) => name.into_bytes(),
            _ => Vec::new(),
        };
        let name = String::from_utf8_lossy(&self.all_gather_bytes(&announce)?[0]).into_owned();
        if name.is_empty() {
            return Ok(());
        }
        let arena = match created {
            Some(a) => Some(a),
            None => Arena::map(&name, world, slot_bytes, false).ok(),
        };
        let votes = self.all_gather_bytes(&[u8::from(arena.is_some())])?;
        if votes.iter().all(|v| v.as_slice() == [1]) {
            self.arena = arena;
        }
        Ok(())
    }

    /// True when a CPU tensor of `bytes` goes through shared memory.
    pub(crate) fn use_shm(&self, bytes: usize) -> bool {
        self.arena.is_some() && bytes >= SHM_MIN_BYTES
    }

    /// Checks that every rank passes the same element count and dtype; a mismatch is the same error
    /// on every rank. Doubles as the barrier that opens a shared-memory collective.
    fn agree_on(&mut self, op: &'static str, t: &Tensor) -> Result<()> {
        let mine = format!("{} {:?}", t.numel(), t.kind());
        let all = self.all_gather_bytes(mine.as_bytes())?;
        if let Some((rank, other)) = all.iter().enumerate().find(|(_, a)| *a != &all[0]) {
            return Err(Error::Collective {
                op,
                detail: format!(
                    "rank 0 passed {} elements but rank {rank} passed {} (element count and dtype); every rank \
                     must pass the same shape and dtype",
                    String::from_utf8_lossy(&all[0]),
                    String::from_utf8_lossy(other)
                ),
            });
        }
        Ok(())
    }

    fn barrier_tcp(&mut self) -> Result<()> {
        self.all_gather_bytes(&[]).map(drop)
    }

    fn arena(&self, op: &'static str) -> Result<&Arena> {
        self.arena.as_ref().ok_or(Error::Collective {
            op,
            detail: "shared memory is not set up".into(),
        })
    }

    /// Runs `step(self, start, len)` over `total` elements of `kind` in slot-sized chunks, with a barrier
    /// between chunks so no rank overwrites a slot another is still reading. (The barrier before the
    /// first chunk is `agree_on`, and the next collective's `agree_on` closes the last one.)
    fn for_each_chunk(
        &mut self,
        op: &'static str,
        total: usize,
        kind: Kind,
        mut step: impl FnMut(&mut Self, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let per_chunk = (self.arena(op)?.slot_bytes / kind.elt_size_in_bytes()).max(1);
        let mut start = 0;
        while start < total {
            let len = per_chunk.min(total - start);
            if start > 0 {
                self.barrier_tcp()?;
            }
            step(self, start, len)?;
            start += len;
        }
        Ok(())
    }

    /// All-reduce through shared memory: every rank writes its chunk into its slot, reduces its share
    /// of the chunk across all slots into slot 0, and copies the result back.
    pub(crate) fn all_reduce_shm(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        let torch = |e| Error::torch(OP, e);
        self.agree_on(OP, t)?;
        let (world, rank, kind) = (self.world_size(), self.rank(), t.kind());
        let flat = t.f_view([-1]).map_err(torch)?;
        self.for_each_chunk(OP, flat.numel(), kind, |me, start, len| {
            let mut part = flat.f_narrow(0, start as i64, len as i64).map_err(torch)?;
            me.arena(OP)?
                .view(rank, 0, len, kind)?
                .f_copy_(&part)
                .map_err(torch)?;
            me.barrier_tcp()?;
            // This rank's share of the chunk, [lo, lo + n): only this rank touches it in slot 0 now.
            let (lo, n) = share(len, world, rank);
            if n > 0 {
                let arena = me.arena(OP)?;
                let mut acc = arena.view(0, lo, n, kind)?;
                for j in 1..world {
                    let other = arena.view(j, lo, n, kind)?;
                    match op {
                        ReduceOp::Sum | ReduceOp::Mean => acc.f_add_(&other).map(drop),
                        ReduceOp::Product => acc.f_mul_(&other).map(drop),
                        ReduceOp::Max => acc.f_maximum(&other).and_then(|m| acc.f_copy_(&m)),
                        ReduceOp::Min => acc.f_minimum(&other).and_then(|m| acc.f_copy_(&m)),
                    }
                    .map_err(torch)?;
                }
            }
            me.barrier_tcp()?;
            part.f_copy_(&me.arena(OP)?.view(0, 0, len, kind)?)
                .map_err(torch)
        })?;
        if op == ReduceOp::Mean {
            t.f_div_scalar_(world as f64).map(drop).map_err(torch)?;
        }
        Ok(())
    }

    /// Broadcast through shared memory: the source writes slot 0, everyone copies it out.
    pub(crate) fn broadcast_shm(&mut self, t: &mut Tensor, src: usize) -> Result<()> {
        const OP: &str = "broadcast";
        let torch = |e| Error::torch(OP, e);
        self.agree_on(OP, t)?;
        let (rank, kind) = (self.rank(), t.kind());
        let flat = t.f_view([-1]).map_err(torch)?;
        self.for_each_chunk(OP, flat.numel(), kind, |me, start, len| {
            let mut part = flat.f_narrow(0, start as i64, len as i64).map_err(torch)?;
            if rank == src {
                me.arena(OP)?
                    .view(0, 0, len, kind)?
                    .f_copy_(&part)
                    .map_err(torch)?;
            }
            me.barrier_tcp()?;
            if rank != src {
                part.f_copy_(&me.arena(OP)?.view(0, 0, len, kind)?)
                    .map_err(torch)?;
            }
            Ok(())
        })
    }

    /// All-gather through shared memory into a new tensor of `world` × the input, concatenated on dim 0.
    pub(crate) fn all_gather_shm(&mut self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        let torch = |e| Error::torch(OP, e);
        self.agree_on(OP, t)?;
        let (world, rank, kind) = (self.world_size(), self.rank(), t.kind());
        let flat = t
            .f_contiguous()
            .and_then(|c| c.f_view([-1]))
            .map_err(torch)?;
        let total = flat.numel();
        let mut shape = t.size();
        shape[0] *= world as i64;
        let out = Tensor::f_empty(&shape, (kind, Device::Cpu)).map_err(torch)?;
        let out_flat = out.f_view([-1]).map_err(torch)?;
        self.for_each_chunk(OP, total, kind, |me, start, len| {
            let part = flat.f_narrow(0, start as i64, len as i64).map_err(torch)?;
            me.arena(OP)?
                .view(rank, 0, len, kind)?
                .f_copy_(&part)
                .map_err(torch)?;
            me.barrier_tcp()?;
            for j in 0..world {
                let mut dst = out_flat
                    .f_narrow(0, (j * total + start) as i64, len as i64)
                    .map_err(torch)?;
                dst.f_copy_(&me.arena(OP)?.view(j, 0, len, kind)?)
                    .map_err(torch)?;
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// Rank `rank`'s share `[lo, lo + n)` of `len` elements split over `world` ranks.
fn share(len: usize, world: usize, rank: usize) -> (usize, usize) {
    let base = len / world;
    let extra = len % world;
    let lo = rank * base + rank.min(extra);
    (lo, base + usize::from(rank < extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_chunk() {
        for (len, world) in [(10, 3), (2, 4), (7, 1), (0, 2)] {
            let mut next = 0;
            for r in 0..world {
                let (lo, n) = share(len, world, r);
                assert_eq!(lo, next);
                next += n;
            }
            assert_eq!(next, len);
        }
    }

    #[test]
    fn a_mapped_segment_gives_views() {
        let name = segment_name(1);
        let a = Arena::map(&name, 2, 4096, true).unwrap();
        let b = Arena::map(&name, 2, 4096, false).unwrap();
        Arena::unlink(&name);
        let mut v = a.view(1, 2, 3, Kind::Float).unwrap();
        let _ = v.fill_(7.0);
        let seen = Vec::<f32>::try_from(&b.view(1, 2, 3, Kind::Float).unwrap()).unwrap();
        assert_eq!(seen, vec![7.0; 3]);
        assert!(a.view(1, 1000, 100, Kind::Float).is_err());
        assert!(
            Arena::map(&name, 2, 4096, false).is_err(),
            "the name is gone once unlinked"
        );
    }
}
