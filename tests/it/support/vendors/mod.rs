//! In-process stand-ins for the vendors' token endpoints, one file per vendor.

pub mod login;
pub mod outseta;
