/* Run by the emulated runner's L1 (ci/runner/init-l1) before the cases, so that a runner without a usable KVM
 * says where it stops: opening /dev/kvm, creating a VM, a vCPU or (aarch64) the vGICv3, the only interrupt
 * controller KVM offers under QEMU TCG. Prints one line:
 *   kvm-probe: api=12 vm=ok vcpu=ok [max_ipa_bits=N vgic-v3=ok]
 * with "<step>=failed(<errno text>)" at the first step that fails, and exits 1 then.
 * Built statically for the runner's architecture by ci/runner/lib.sh. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

static int failed(const char *step) {
    printf(" %s=failed(%s)\n", step, strerror(errno));
    return 1;
}

int main(void) {
    printf("kvm-probe:");
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return failed("open");
    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (api < 0)
        return failed("api");
    printf(" api=%d", api);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return failed("vm");
    printf(" vm=ok");
    if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0)
        return failed("vcpu");
    printf(" vcpu=ok");
#ifdef __aarch64__
    printf(" max_ipa_bits=%d", ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_VM_IPA_SIZE));
    struct kvm_create_device gic = { .type = KVM_DEV_TYPE_ARM_VGIC_V3 };
    if (ioctl(vm, KVM_CREATE_DEVICE, &gic) < 0)
        return failed("vgic-v3");
    printf(" vgic-v3=ok");
#endif
    printf("\n");
    return 0;
}
