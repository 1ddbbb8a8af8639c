//! Map capacities changed in the node configuration take effect on a pinned datapath, without
//! losing what its maps hold.
//!
//! A map adopted from its pin keeps the size it was created with, and the kernel cannot resize a
//! map. So a map whose configured size differs is moved aside (pinned under another name), the
//! programs are loaded with a new map of the configured size pinned in its place, the entries
//! are copied over, the programs are relinked onto the new maps (see [`crate::upgrade`]), and
//! the entries the old programs made in between are copied too before the old map goes. Flows,
//! affinity, counters and what is programmed carry over.
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
    /// Entries the first copy wrote, and what it read.
    copied: usize,
    keys: Copied,
}

impl Move {
    fn new(name: &'static str, from_entries: u32, to_entries: u32, resumed: bool) -> Self {
        Self { name, from_entries, to_entries, resumed, copied: 0, keys: Copied::nothing(name) }
    }
}

impl Resizing {
    /// Before loading: moves aside every pinned map whose size differs from `capacities`, and
    /// takes up moves a stopped daemon left unfinished (after [`restore_unstarted`]).
    pub fn begin(pins: &PinLayout, capacities: &Capacities) -> Result<Self> {
        restore_unstarted(pins)?;
        let mut moves = Vec::new();
        for name in MAP_NAMES {
            let Some(configured) = capacities.of(name) else { continue };
            let (pinned, aside) = (pins.map(name), pins.map_set_aside(name));
            if aside.exists() {
                // Stopped after the new map was pinned: copy again and relink.
                let (from_entries, to_entries) = (entries(name, &aside)?, entries(name, &pinned)?);
                moves.push(Move::new(name, from_entries, to_entries, true));
                continue;
            }
            if !pinned.exists() {
                continue;
            }
            let (from_entries, to_entries) = (entries(name, &pinned)?, configured);
            if from_entries == to_entries {
                continue;
            }
            // The maps the programs insert into are LRU maps, which make room by evicting their
            // oldest entries; the others hold what the daemon programmed, addressed by ids that
            // need not fit a smaller map.
            if to_entries < from_entries && !copy::programs_write(name) {
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

    /// After loading, with the new maps pinned: copies every entry of the old maps into them.
    /// A resumed move of a map the programs write leaves it all to [`Self::finish`], which
    /// does not overwrite what the programs wrote into the new map since.
    pub fn copy(&mut self) -> Result<()> {
        for moved in &mut self.moves {
            if moved.resumed && copy::programs_write(moved.name) {
                continue;
            }
            let (from, to) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            (moved.copied, moved.keys) = copy::copy_all(moved.name, &from, &to)?;
        }
        Ok(())
    }

    /// Once the programs use the new maps: copies what the old programs added since
    /// [`Self::copy`], and lets the old maps go.
    pub fn finish(self) -> Result<()> {
        for moved in self.moves {
            let (from, to) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            let late = copy::copy_new_entries(moved.name, &from, &to, &moved.keys)?;
            fs::remove_file(&from).map_err(Error::io(&from))?;
            let (name, from, to, copied) =
                (moved.name, moved.from_entries, moved.to_entries, moved.copied + late);
            if moved.resumed {
                info!(map = name, from, to, copied, "finished a resize a stopped daemon began");
            } else {
                info!(map = name, from, to, copied, "resized to the configured capacity");
            }
        }
        Ok(())
    }

    /// After a failure before any program moved to the new maps: unpins them and puts the old
    /// ones back, as they were. A resumed move stays for the next start: programs may use its
    /// new map already.
    pub fn abandon(self) {
        for moved in self.moves.into_iter().filter(|moved| !moved.resumed) {
            let (aside, pinned) = (self.pins.map_set_aside(moved.name), self.pins.map(moved.name));
            let restored = fs::remove_file(&pinned)
                .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
                .map_err(Error::io(&pinned))
                .and_then(|()| copy::move_pin(moved.name, &aside, &pinned));
            if let Err(error) = restored {
                warn!(map = moved.name, %error, "the old map is not back; the next start puts it back");
            }
        }
    }
}
