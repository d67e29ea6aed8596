//! Work on local files that both sides' transfers and the server's stores do: the disk pool, atomic commits, mtimes and modes, resume prefixes.
//!
//! Below both `exchange` (which frames bytes for the wire) and `store`
//! (where the server keeps files), so that a store needs nothing of the
//! wire: `pool` (the bounded disk threads every blocking call goes
//! through), `commit` (temporaries, atomic and group commits, renames),
//! `meta` (timestamps and modes), `start` (checking a resume prefix).

mod commit;
mod meta;
mod pool;
mod start;

pub(crate) use commit::*;
pub(crate) use meta::*;
pub(crate) use pool::*;
pub(crate) use start::*;
