//! The state file. (Being written.)
#![allow(unsafe_code)]
