//! Models built under `init_empty_weights`: every rank agrees on it, then fills only its piece of each
//! placeholder parameter, drawing each one whole from rank 0's generators.

use super::*;
use crate::distributed::Group;

/// A placeholder parameter still to be materialised into its unit's chunk.
pub(super) struct Pending {
    pub(super) unit: usize,
    pub(super) param: usize,
    pub(super) recipe: crate::layers::Recipe,
    /// Its element's address: the recipe's key.
    pub(super) addr: usize,
}

/// Fails on every rank unless all or none built the model under `init_empty_weights` (collective):
/// their broadcasts and draws would not pair up otherwise. Called before anything else is exchanged.
pub(crate) fn agree_on_empty_weights(group: &mut crate::ProcessGroup, has: bool) -> Result<()> {
    let flags = group
        .all_gather_bytes(&[u8::from(has)])
        .map_err(|e| chained("FSDP materialising", e))?;
    let with: Vec<usize> = (0..flags.len()).filter(|r| flags[*r] == [1]).collect();
    if !with.is_empty() && with.len() != flags.len() {
        return Err(Error::InvalidValue {
            name: "FSDP model".into(),
            detail: format!(
                "ranks {with:?} built the model under init_empty_weights and the others did not; every \
                 rank must build it the same way"
            ),
        });
    }
    Ok(())
}

/// Fills each pending placeholder's piece of this rank's chunk (collective among ranks that, as
/// [`agree_on_empty_weights`] checked, all have placeholders). The values are drawn whole, one parameter
/// at a time and in the order they were made, from rank 0's generator states
/// (`random::draw_as_rank_0`).
pub(super) fn materialize_pieces(
    units: &[Unit],
    pending: &[Pending],
    group: &Group,
    rank: i64,
) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    crate::random::draw_as_rank_0(&mut group.lock(), || {
        let _no_grad = tch::no_grad_guard();
        for p in pending {
            let unit = &units[p.unit];
            let whole = crate::layers::materialize(&unit.shapes[p.param], p.recipe)
                .map_err(torch("FSDP materialising"))?;
            unit.fill_piece(p.param, rank, &whole)
                .map_err(torch("FSDP materialising"))?;
            crate::layers::forget_recipe(p.addr);
        }
        Ok(())
    })
}
