//! The reconciler: a pure diff from the desired tables to the programmed ones, emitting map
//! operations through a [`MapWriter`]. Only what changed is written; a resync with no change
//! writes nothing.

mod desired;
mod diff;
mod ids;
mod state;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use tracing::{debug, info_span};

pub use self::{
    desired::{Desired, SlotMode, desired, node_config},
    diff::{diff, removed_pairs},
    ids::Ids,
    state::DatapathState,
};
use crate::{
    config::NodeConfig,
    error::Result,
    loader::Capacities,
    maps::{MapOp, MapWriter},
    model::Model,
};

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct Report {
    /// The operations written, in order.
    pub ops: Vec<MapOp>,
    /// Parts of the model that could not be programmed.
    pub problems: Vec<String>,
    /// (frontend id, backend id) pairs removed: their non-TCP flows must be forgotten.
    pub removed_pairs: BTreeSet<(u32, u32)>,
}

/// Keeps the programmed state and the id allocation between reconciles.
#[derive(Debug)]
pub struct Reconciler {
    programmed: DatapathState,
    ids: Ids,
    mode: SlotMode,
}

impl Reconciler {
    /// Starts from what is programmed (empty for a fresh datapath, read from the pinned maps
    /// after a restart): the first reconcile then writes only the difference, never a flush.
    pub fn new(programmed: DatapathState, mode: SlotMode) -> Self {
        Self::with_capacities(programmed, mode, &Capacities::default())
    }

    /// [`Reconciler::new`] for maps loaded with other sizes: ids must fit them.
    pub fn with_capacities(
        programmed: DatapathState,
        mode: SlotMode,
        capacities: &Capacities,
    ) -> Self {
        let ids = Ids::from_programmed(&programmed, capacities.services(), capacities.backends());
        Self { programmed, ids, mode }
    }

    pub fn programmed(&self) -> &DatapathState {
        &self.programmed
    }

    /// Brings the maps to the state `model` asks for. On a write error the programmed state is
    /// unknown in part: call [`Reconciler::new`] again with what the maps hold.
    pub fn reconcile(
        &mut self,
        model: &Model,
        node: &NodeConfig,
        writer: &mut impl MapWriter,
    ) -> Result<Report> {
        let span = info_span!("reconcile", service_ports = model.ports.len());
        let _entered = span.enter();
        let desired = desired(model, node, self.mode, &mut self.ids);
        let ops = diff(&self.programmed, &desired.state);
        for op in &ops {
            writer.apply(op)?;
        }
        let removed_pairs = removed_pairs(&self.programmed, &desired.state);
        self.programmed = desired.state;
        self.ids.retain_used(&self.programmed);
        debug!(ops = ops.len(), removed_pairs = removed_pairs.len(), "reconciled");
        Ok(Report { ops, problems: desired.problems, removed_pairs })
    }
}
