//! Where a model runs: lugh's own CPU kernels, or candle tensors on a CPU, CUDA or Metal device.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A device name as users write it: "cpu", "candle-cpu", "cuda", "cuda:N", "metal", "metal:N".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// lugh's own kernels on host memory (the default, fastest on a CPU).
    Cpu,
    /// The candle recipe on the CPU: how the device path is tested without a GPU.
    CandleCpu,
    Cuda(usize),
    Metal(usize),
}

impl Device {
    /// Whether this device runs the candle recipe.
    pub fn is_candle(self) -> bool {
        !matches!(self, Device::Cpu)
    }

    /// Opens the candle device; a clear error names the missing feature or driver.
    pub(crate) fn open(self) -> Result<candle_core::Device> {
        let unavailable = |reason: String| Error::DeviceUnavailable {
            device: self.to_string(),
            reason,
        };
        match self {
            Device::Cpu | Device::CandleCpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(unavailable(
                        "this build of lugh has no CUDA support: build it with the `cuda` feature (README, \"GPU builds\")".into(),
                    ));
                }
                candle_core::Device::new_cuda(n).map_err(|e| {
                    unavailable(format!(
                        "{e} (is an NVIDIA driver installed, and is there a GPU {n}?)"
                    ))
                })
            }
            Device::Metal(n) => {
                if !cfg!(feature = "metal") {
                    return Err(unavailable(
                        "this build of lugh has no Metal support: build it with the `metal` feature (README, \"GPU builds\")".into(),
                    ));
                }
                candle_core::Device::new_metal(n).map_err(|e| unavailable(e.to_string()))
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::CandleCpu => write!(f, "candle-cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(name: &str) -> Result<Device> {
        let bad = || {
            Error::invalid(
                "device",
                format!(
                    "'{name}': expected \"cpu\", \"candle-cpu\", \"cuda\", \"cuda:N\", \"metal\" or \"metal:N\""
                ),
            )
        };
        let (kind, index) = match name.split_once(':') {
            Some((kind, index)) => (kind, Some(index.parse::<usize>().map_err(|_| bad())?)),
            None => (name, None),
        };
        match (kind, index) {
            ("cpu", None) => Ok(Device::Cpu),
            ("candle-cpu", None) => Ok(Device::CandleCpu),
            ("cuda", n) => Ok(Device::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Device::Metal(n.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

/// The devices this build offers on this machine: "cpu" and "candle-cpu" always, then every
/// CUDA or Metal device that opens.
pub fn devices() -> Vec<Device> {
    let mut found = vec![Device::Cpu, Device::CandleCpu];
    for kind in [Device::Cuda as fn(usize) -> Device, Device::Metal] {
        let compiled = match kind(0) {
            Device::Cuda(_) => cfg!(feature = "cuda"),
            _ => cfg!(feature = "metal"),
        };
        if !compiled {
            continue;
        }
        found.extend((0..).map(kind).take_while(|device| device.open().is_ok()));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for (name, device) in [
            ("cpu", Device::Cpu),
            ("candle-cpu", Device::CandleCpu),
            ("cuda:1", Device::Cuda(1)),
            ("metal:0", Device::Metal(0)),
        ] {
            assert_eq!(name.parse::<Device>().unwrap(), device);
            assert_eq!(device.to_string(), name);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        for bad in ["gpu", "cuda:x", "cpu:0", "", "cuda:-1"] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.to_string().contains("expected \"cpu\""), "{err}");
        }
    }

    #[test]
    fn a_device_missing_from_the_build_names_its_feature() {
        if cfg!(feature = "cuda") {
            return;
        }
        let err = Device::Cuda(0).open().unwrap_err();
        assert!(err.to_string().contains("`cuda` feature"), "{err}");
        assert!(devices().iter().all(|d| !matches!(d, Device::Cuda(_))));
    }
}
