#![no_std]
// This file exists so that edge-classifier's build.rs can depend on this crate and be rebuilt
// when it changes; the program itself is the `edge-classifier` binary target.
