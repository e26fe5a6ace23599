// Umbrella header for LibTorch programs: #include <mixprec/mixprec.h> and link mixprec::mixprec.
#pragma once

#include "mixprec/fp8.h"
#include "mixprec/grad_scaler.h"
#include "mixprec/int8.h"
#include "mixprec/monitor.h"
#include "mixprec/nn.h"
#include "mixprec/ops.h"
#include "mixprec/optim.h"
#include "mixprec/policy.h"
#include "mixprec/qat.h"
#include "mixprec/version.h"
