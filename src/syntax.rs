//! nginx syntax: `server ...;` bodies and `upstream NAME { ... }` files.
//! (Being written.)
