/* Test stage with a license that is not GPL-compatible. */
#include <rootlet/stage.h>

ROOTLET_STAGE(proprietary)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Proprietary";
