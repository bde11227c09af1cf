// This file exists to enable the library target; the programs are in main.rs.
#![no_std]
