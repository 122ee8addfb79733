//! profile-cache: the Redis model of customer profiles.
//!
//! The collector hands it [`ProfileUpdate`]s (the events of one batch for one profile); it
//! applies each atomically and idempotently in one Redis round trip, appends the events to a
//! capped stream, re-evaluates the profile's segments in the same call (memberships,
//! transitions stream, next deadline), re-evaluates the profiles whose deadline has come
//! (claimed with a lease, so that several schedulers can run), rebuilds the memberships of
//! existing profiles when the segment definitions change, and reads profiles back for the
//! API and for ESP connectors. It knows nothing of HTTP or FlatBuffers.
//!
//! - [`model`]: domain types (events, consent, profile ids, profiles).
//! - [`identity`]: merging an anonymous profile into the user profile it turned out to be,
//!   and redirecting later updates of a merged profile ([`RedisProfiles::merge`]).
//! - [`keys`]: the Redis key schema, a public contract for connectors that read Redis.
//! - [`store`]: [`RedisProfiles`], applying updates and reading profiles, and its config.
//! - `reads` (private): reads for the API and connectors: the recorded segments
//!   ([`RecordedSegments`]), sizes, pages of members with chosen traits behind a stable
//!   cursor ([`MemberPage`], [`MemberCursor`]), and the transitions stream through a
//!   consumer group ([`TransitionConsumer`]); [`RedisProfiles::connect_reader`] connects
//!   without writing.
//! - `script` (private): the apply script `apply.lua` with the segments written in, its
//!   arguments, and the event stream entry it writes.
//! - [`schedule`]: the deadline schedule: claiming due profiles with a lease and
//!   re-evaluating their segments ([`RedisProfiles::claim_due`],
//!   [`RedisProfiles::evaluate_claimed`]).
//! - [`rebuild`]: bringing the memberships of existing profiles in line with changed,
//!   added or removed segment definitions, in resumable steps under a lease ([`Rebuild`]).
//! - [`lifecycle`]: lifecycle stage thresholds and the stage of a profile at a time.
//! - [`segments`]: segment definitions, their checks, the compiled form and the reference
//!   (from-scratch) evaluator with deadlines.
//! - [`privacy`]: privacy rights: exporting everything stored about a person, erasing it,
//!   and suppressing the erased ids so late events cannot recreate them
//!   ([`RedisProfiles::export`], [`RedisProfiles::erase`], [`RedisProfiles::apply_batch`]).
//! - [`audit`]: the audit stream: who read, exported or deleted which profile (its id
//!   hashed), when, with what result ([`audit::AuditStream`]).
//! - `testing` (feature `testing`): throwaway `redis-server` processes for tests and tools.

pub mod audit;
pub mod identity;
pub mod keys;
pub mod lifecycle;
pub mod model;
pub mod privacy;
mod reads;
pub mod rebuild;
pub mod schedule;
mod script;
pub mod segments;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use identity::MergeOutcome;
pub use lifecycle::LifecycleThresholds;
pub use model::{
    ApplyReport, CartLine, ConsentChange, ConsentMask, ConsentRecord, ConsentState, ConsentStatus,
    Context, Event, EventKind, IdError, Item, Lifecycle, Profile, ProfileId, ProfileUpdate,
    Purpose, SegmentMembership, Value, ViewedProduct,
};
pub use privacy::{BatchReport, Erasure, ErasureStatus, Export};
pub use reads::{
    Change, CursorError, GroupStart, MemberCursor, MemberPage, MembersRequest, RecordedSegment,
    RecordedSegments, SegmentMember, TRANSITIONS_WAIT, Transition, TransitionBatch,
    TransitionConsumer,
};
pub use rebuild::{Changes, Rebuild, Step};
pub use schedule::{Claim, Claimed, Outcome, Reason};
pub use store::{ConfigError, ProfileConfig, RedisProfiles, RedisTls, StoreError};
