//! The teacher side of the toolkit. Today: the math answer verifier ([`verify`]).

pub mod verify;
