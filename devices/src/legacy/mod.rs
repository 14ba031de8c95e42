//! Legacy platform devices: UART, keyboard controller (for its reset line), CMOS RTC, ACPI PM block, reset port.

mod acpi_pm;
mod cmos;
mod i8042;
mod reset_port;
mod serial;

pub use acpi_pm::{AcpiPmBlock, BLOCK_LEN as ACPI_PM_BLOCK_LEN};
pub use cmos::Cmos;
pub use i8042::I8042;
pub use reset_port::ResetPort;
pub use serial::Serial;
