//! A 16550A UART on top of vm-superio, with input buffered beyond the UART's 64-byte FIFO so that pasted or piped
//! input is never dropped.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::Trigger;

use crate::bus::reply_byte;
use crate::{BusDevice, InterruptLine};

/// Adapts an `InterruptLine` to vm-superio's trigger.
struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<LineTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
    /// Input the guest has not yet made room for.
    pending_input: VecDeque<u8>,
}

impl Serial {
    pub fn new(interrupt: Arc<dyn InterruptLine>, output: Box<dyn Write + Send>) -> Self {
        Serial { uart: Uart::new(LineTrigger(interrupt), output), pending_input: VecDeque::new() }
    }

    /// Queues host input for the guest; it enters the UART's FIFO as the guest drains it.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend(bytes);
        self.fill_fifo();
    }

    /// Bytes accepted from the host but not yet visible in the UART's FIFO.
    pub fn pending_input_len(&self) -> usize {
        self.pending_input.len()
    }

    /// Back to power-on state (guest reset); host input not yet delivered is kept for the next boot.
    pub fn reset(&mut self) {
        let Serial { uart, .. } = self;
        let trigger = LineTrigger(uart.interrupt_evt().0.clone());
        let output = std::mem::replace(uart.writer_mut(), Box::new(io::sink()));
        *uart = Uart::new(trigger, output);
    }

    fn fill_fifo(&mut self) {
        let room = self.uart.fifo_capacity();
        if room == 0 || self.pending_input.is_empty() {
            return;
        }
        let chunk: Vec<u8> = self.pending_input.iter().take(room).copied().collect();
        // Only a failed interrupt can make this fail after the bytes were queued; they are in the FIFO either way.
        let queued = match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(n) => n,
            Err(_) => chunk.len().min(room),
        };
        self.pending_input.drain(..queued);
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Ok(register) = u8::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        reply_byte(data, self.uart.read(register));
        self.fill_fifo();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(register), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        // An output error (closed terminal, full disk) must not stop the guest; the byte is lost either way.
        let _ = self.uart.write(register, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{CountingLine, SharedBuffer};

    const RBR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn read(serial: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        serial.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let out = SharedBuffer::default();
        let mut serial = Serial::new(Arc::new(CountingLine::default()), Box::new(out.clone()));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_longer_than_the_fifo_arrives_whole_and_in_order() {
        let line = Arc::new(CountingLine::default());
        let mut serial = Serial::new(line.clone(), Box::new(io::sink()));
        serial.write(IER, &[1]); // receive-data interrupt on
        let input: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        serial.queue_input(&input);
        assert!(serial.pending_input_len() > 0, "the FIFO holds only 64 bytes");
        let mut received = Vec::new();
        while read(&mut serial, LSR) & LSR_DATA_READY != 0 {
            received.push(read(&mut serial, RBR));
        }
        assert_eq!(received, input);
        assert!(line.count() > 0, "input must raise the interrupt");
    }

    #[test]
    fn reset_keeps_output_and_undelivered_input() {
        let out = SharedBuffer::default();
        let mut serial = Serial::new(Arc::new(CountingLine::default()), Box::new(out.clone()));
        serial.write(IER, &[1]);
        serial.queue_input(&[b'x'; 100]);
        serial.reset();
        assert_eq!(read(&mut serial, IER), 0, "registers are back to power-on values");
        serial.write(0, b"a");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"a");
        let mut count = 0;
        serial.queue_input(&[]);
        while read(&mut serial, LSR) & LSR_DATA_READY != 0 {
            read(&mut serial, RBR);
            count += 1;
        }
        assert_eq!(count, 100 - 64, "what had reached the old FIFO was consumed by the old boot");
    }

    #[test]
    fn out_of_range_offsets_are_harmless() {
        let mut serial = Serial::new(Arc::new(CountingLine::default()), Box::new(io::sink()));
        let mut data = [0u8; 2];
        serial.read(1 << 40, &mut data);
        assert_eq!(data, [0xff; 2]);
        serial.write(1 << 40, &[1]);
        serial.write(0, &[]);
    }
}
