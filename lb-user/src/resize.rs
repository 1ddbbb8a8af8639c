//! Map capacities changed in the node configuration take effect on a pinned datapath, without
//! losing what its maps hold.
//!
//! A map adopted from its pin keeps the size it was created with, and the kernel cannot resize a
//! map. So a map whose configured size differs is moved aside (pinned under another name), the
//! programs are loaded with a new map of the configured size pinned in its place, and the
//! entries are copied over (see [`crate::maps::copy`]: live conntrack entries only, the least
//! recently used first, so that a smaller LRU map keeps the most recent). Then every program is
//! relinked onto the new maps, one at a time (see [`crate::upgrade`]), and a second pass
//! carries over what the old programs changed meanwhile (new flows, refreshed or changed
//! entries, counts) before the old maps go. Flows, affinity, counters and what is programmed
//! carry over. The cost is a moment, one read of the old map long, in which a reply to a flow
//! opened just before the move may reach a new program before its entries do, and pass
//! untranslated.
//!
//! A daemon stopped part way leaves the old map aside; the next one finishes the move.

use std::fs;

use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    loader::{Capacities, MAP_NAMES, pinned_entries as entries},
    maps::copy::{self, Copied},
    pins::PinLayout,
};

/// Puts back every map a stopped daemon moved aside without pinning a new one in its place:
/// before anything opens the pinned maps.
pub fn restore_unstarted(pins: &PinLayout) -> Result<()> {
    for name in MAP_NAMES {
        let (pinned, aside) = (pins.map(name), pins.map_set_aside(name));
        if aside.exists() && !pinned.exists() {
            copy::move_pin(name, &aside, &pinned)?;
        }
    }
    Ok(())
}

/// The maps being resized in one load.
#[must_use = "an unfinished resize leaves the old maps aside"]
pub struct Resizing {
    pins: PinLayout,
    moves: Vec<Move>,
}

/// One map moved aside for a successor of another size.
struct Move {
    name: &'static str,
    from_entries: u32,
    to_entries: u32,
    /// A move a stopped daemon began: the programs may already use the new map.
    resumed: bool,
    /// Entries the first pass wrote, and what it read.
    copied: usize,
    read: Copied,
}

impl Move {
    fn new(name: &'static str, from_entries: u32, to_entries: u32, resumed: bool) -> Self {
        Self { name, from_entries, to_entries, resumed, copied: 0, read: Copied::Complete }
    }
}

impl Resizing {
    /// Before loading, after [`restore_unstarted`]: moves aside every pinned map whose size
    /// differs from `capacities`, and takes up the moves a stopped daemon left unfinished.
    pub fn begin(pins: &PinLayout, capacities: &Capacities) -> Result<Self> {
        let mut moves = Vec::new();
        for name in MAP_NAMES {
            let Some(configured) = capacities.of(name) else { continue };
            let (pinned, aside) = (pins.map(name), pins.map_set_aside(name));
            if !pinned.exists() {
                continue;
            }
            copy::check_layout(name, &pinned)?;
            if aside.exists() {
                if copy::same_map(name, &aside, &pinned)? {
                    // Stopped while moving the pin: nothing was loaded yet.
                    fs::remove_file(&aside).map_err(Error::io(&aside))?;
                } else {
                    // Stopped after the new map was pinned: copy again and relink.
                    copy::check_layout(name, &aside)?;
                    let (from_entries, to_entries) =
                        (entries(name, &aside)?, entries(name, &pinned)?);
                    moves.push(Move::new(name, from_entries, to_entries, true));
                    continue;
                }
            }
            let (from_entries, to_entries) = (entries(name, &pinned)?, configured);
            if from_entries == to_entries {
                continue;
            }
            // The maps the programs insert into are LRU maps, which make room by evicting; the
            // others hold what the daemon programmed, addressed by ids that need not fit a
            // smaller map.
            if to_entries < from_entries && !copy::programs_insert(name) {
                warn!(
                    map = name,
                    pinned = from_entries,
                    configured = to_entries,
                    "kept at its pinned size: the ids and slots in use may lie beyond a smaller \
                     one; a datapath loaded afresh (after `lb-user unload`) takes it"
                );
                continue;
            }
            copy::move_pin(name, &pinned, &aside)?;
            moves.push(Move::new(name, from_entries, to_entries, false));
        }
        Ok(Self { pins: pins.clone(), moves })
    }

    /// True if no map changes size: the programs may stay where they are.
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// After loading, with the new maps pinned, before the programs move to them: copies the
    /// entries of the old maps into them (for a resumed move, the entries they lack).
    pub fn copy(&mut self) -> Result<()> {
        for moved in &mut self.moves {
            let (from, to) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            let first_pass = if moved.resumed { copy::copy_missing } else { copy::copy_all };
            (moved.copied, moved.read) = first_pass(moved.name, &from, &to)?;
        }
        Ok(())
    }

    /// Once the programs use the new maps: carries over what the old programs changed since
    /// [`Self::copy`], and lets the old maps go.
    pub fn finish(self) -> Result<()> {
        for moved in self.moves {
            let (from, to) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            let late = copy::copy_changes(moved.name, &from, &to, &moved.read)?;
            fs::remove_file(&from).map_err(Error::io(&from))?;
            let (name, from, to, copied, late) =
                (moved.name, moved.from_entries, moved.to_entries, moved.copied, late);
            if moved.resumed {
                info!(
                    map = name,
                    from, to, copied, late, "finished a resize a stopped daemon began"
                );
            } else {
                info!(map = name, from, to, copied, late, "resized to the configured capacity");
            }
        }
        Ok(())
    }

    /// After a failure before any program was moved to the new maps: unpins them and puts the
    /// old ones back, as they were. A resumed move stays for the next start: programs may use
    /// its new map already.
    pub fn abandon(self) {
        for moved in self.moves.into_iter().filter(|moved| !moved.resumed) {
            let (aside, pinned) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            // The new map may not be pinned yet; putting the old one back fails if it is and
            // cannot be unpinned.
            let _ = fs::remove_file(&pinned);
            if let Err(error) = copy::move_pin(moved.name, &aside, &pinned) {
                let error = crate::error::chain(&error);
                warn!(
                    map = moved.name,
                    error, "the old map is not back; the next start puts it back"
                );
            }
        }
    }
}
