//! modelgate's control plane: watches ModelRoutes, ApiKeys and Secrets, compiles them into
//! one versioned snapshot, pushes it to every connected proxy, and reports status.
//!
//! ```text
//!  kube-apiserver ─watch─► controller (index → compile → publish) ─► server (streams) ─► proxies
//!        ▲                                                              │ acks, usage
//!        └──────────── status (leader only; leader: Lease) ◄────────────┘
//! ```
#![forbid(unsafe_code)]

pub mod cli;
pub mod controller;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod status;
pub mod tenancy;
pub mod tls;
pub mod usage;
