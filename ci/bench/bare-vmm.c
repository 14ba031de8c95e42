// bare-vmm: the smallest VMM that boots the benchmark's PVH payload, as the floor for Kestrel's start-up time,
// exit-handling cost and memory footprint. Only KVM ioctls: no devices beyond "COM1 output goes to stdout".
//
// Usage: bare-vmm PAYLOAD.elf
// Loads the ELF's PT_LOAD segments into 128 MiB of guest RAM, finds the PVH entry (Xen ELF note type 18),
// enters it in flat 32-bit protected mode with paging off and EBX = a minimal hvm_start_info, as the PVH boot ABI
// says, and runs until the guest writes SLP_EN to PM1a_CNT (0x604), writes QEMU's debug-exit port 0xf4, halts or
// shuts down. Written from Documentation/virt/kvm/api.rst and the PVH ABI (xen/include/public/arch-x86/hvm/start_info.h).
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEM_SIZE (128UL << 20)
#define START_INFO_ADDR 0x6000UL
#define XEN_ELFNOTE_PHYS32_ENTRY 18

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int kvm_ioctl(int fd, unsigned long req, void *arg, const char *what) {
    int r = ioctl(fd, req, arg);
    if (r < 0)
        die(what);
    return r;
}

// Copy the PT_LOAD segments into guest memory; return the PVH entry from the PT_NOTE segments (0 if none).
static uint32_t load_elf(const char *path, uint8_t *mem) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        die(path);
    uint8_t *f = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f == MAP_FAILED)
        die("mmap payload");
    const Elf64_Ehdr *eh = (const void *)f;
    if ((size_t)st.st_size < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > (uint64_t)st.st_size) {
        fprintf(stderr, "%s: not an ELF64 file\n", path);
        exit(1);
    }
    uint32_t entry = 0;
    const Elf64_Phdr *ph = (const void *)(f + eh->e_phoff);
    for (int i = 0; i < eh->e_phnum; i++, ph++) {
        if (ph->p_offset + ph->p_filesz > (uint64_t)st.st_size) {
            fprintf(stderr, "%s: segment %d outside the file\n", path, i);
            exit(1);
        }
        if (ph->p_type == PT_LOAD) {
            if (ph->p_paddr + ph->p_memsz > MEM_SIZE || ph->p_filesz > ph->p_memsz) {
                fprintf(stderr, "%s: segment %d does not fit in guest RAM\n", path, i);
                exit(1);
            }
            memcpy(mem + ph->p_paddr, f + ph->p_offset, ph->p_filesz); // the rest is fresh anonymous memory: zero
        } else if (ph->p_type == PT_NOTE) {
            // Notes: 4-byte namesz, descsz, type; name and desc each padded to 4 bytes.
            for (uint64_t off = 0; off + sizeof(Elf64_Nhdr) <= ph->p_filesz;) {
                const Elf64_Nhdr *n = (const void *)(f + ph->p_offset + off);
                const char *name = (const char *)(n + 1);
                const uint8_t *desc = (const uint8_t *)name + ((n->n_namesz + 3) & ~3u);
                if (n->n_type == XEN_ELFNOTE_PHYS32_ENTRY && n->n_namesz == 4 && !memcmp(name, "Xen", 4) &&
                    n->n_descsz >= 4)
                    memcpy(&entry, desc, 4);
                off += sizeof(*n) + ((n->n_namesz + 3) & ~3u) + ((n->n_descsz + 3) & ~3u);
            }
        }
    }
    munmap(f, st.st_size);
    close(fd);
    return entry;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PAYLOAD.elf\n", argv[0]);
        return 2;
    }
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
        fprintf(stderr, "unexpected KVM API version\n");
        return 1;
    }
    int vm = kvm_ioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
    // Intel needs a TSS region outside guest RAM; harmless elsewhere. Same address as Kestrel's layout.
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
        die("KVM_SET_TSS_ADDR");

    // MAP_NORESERVE and no pre-faulting: like any VMM, only the pages the guest touches become resident.
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem};
    kvm_ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

    uint32_t entry = load_elf(argv[1], mem);
    if (!entry) {
        fprintf(stderr, "%s: no PVH entry note\n", argv[1]);
        return 1;
    }
    uint32_t start_info[2] = {0x336ec578, 1}; // hvm_start_info: magic, version; no modules, no cmdline
    memcpy(mem + START_INFO_ADDR, start_info, sizeof(start_info));

    int vcpu = kvm_ioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    int run_size = kvm_ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    // PVH: CR0.PE only, flat 4 GiB code (execute/read) and data (read/write) segments, no paging.
    struct kvm_sregs sregs;
    kvm_ioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
    struct kvm_segment flat = {.base = 0, .limit = 0xffffffff, .present = 1, .dpl = 0, .db = 1, .s = 1, .g = 1};
    sregs.cs = flat;
    sregs.cs.selector = 0x08;
    sregs.cs.type = 0xb; // code, execute/read, accessed
    flat.selector = 0x10;
    flat.type = 0x3; // data, read/write, accessed
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = flat;
    sregs.cr0 = 0x1;
    sregs.cr4 = 0;
    sregs.efer = 0;
    kvm_ioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = entry, .rbx = START_INFO_ADDR, .rflags = 0x2};
    kvm_ioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

    unsigned long ignored = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            die("KVM_RUN");
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint32_t value = 0;
            memcpy(&value, data, run->io.size < 4 ? run->io.size : 4);
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (run->io.port == 0x3f8) {
                    if (write(STDOUT_FILENO, data, (size_t)run->io.size * run->io.count) < 0)
                        die("write stdout");
                } else if ((run->io.port == 0x604 && (value & 0x2000)) || run->io.port == 0xf4) {
                    if (getenv("BARE_VMM_VERBOSE"))
                        fprintf(stderr, "bare-vmm: stop on port %#x, %lu other port writes\n", run->io.port, ignored);
                    return 0;
                } else {
                    ignored++;
                }
            } else {
                // Reads: LSR says "transmitter empty", everything else floats high.
                memset(data, run->io.port == 0x3fd ? 0x60 : 0xff, (size_t)run->io.size * run->io.count);
            }
            break;
        }
        case KVM_EXIT_HLT:
            return 0;
        case KVM_EXIT_SHUTDOWN:
            fprintf(stderr, "bare-vmm: guest shutdown (triple fault)\n");
            return 3;
        default:
            fprintf(stderr, "bare-vmm: unexpected exit reason %u\n", run->exit_reason);
            return 1;
        }
    }
}
