//! Legacy platform devices: UARTs (16550, PL011), keyboard controller (for its reset line), RTCs (CMOS, PL031),
//! the PL061 GPIO controller (for its power key), ACPI PM block, reset port, QEMU's fw_cfg (for firmware).

mod acpi_pm;
mod cmos;
pub mod fw_cfg;
mod i8042;
mod pl011;
mod pl031;
mod pl061;
mod primecell;
mod receive_gate;
mod reset_port;
mod serial;

pub use acpi_pm::{AcpiPmBlock, AcpiPmState, BLOCK_LEN as ACPI_PM_BLOCK_LEN};
pub use cmos::{Cmos, CmosState};
pub use fw_cfg::FwCfg;
pub use i8042::{I8042State, I8042};
pub use pl011::{Pl011, Pl011State};
pub use pl031::{Pl031, Pl031State};
pub use pl061::{Pl061, Pl061State};
pub use primecell::WINDOW_SIZE as PRIMECELL_WINDOW_SIZE;
pub use reset_port::{ResetPort, ResetPortState};
pub use serial::{Serial, SerialDeviceState};
