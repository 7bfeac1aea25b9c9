//! What needs no attached classifier: the reference classifier, `explain`, `replay` and the
//! capture files they read and write.
pub mod capture;
pub mod explain;
pub mod reference;
pub mod replay;
