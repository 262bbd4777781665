# GPU architectures for a build against torch's CMake config.
#
# torch's config (Caffe2/public/cuda.cmake) compiles for TORCH_CUDA_ARCH_LIST (variable or
# environment) by appending -gencode flags to CMAKE_CUDA_FLAGS, and ignores CMAKE_CUDA_ARCHITECTURES
# with a warning when it is defined. Its default, "Auto", falls back without a GPU to a list that
# starts at sm_50, which nvcc 13 rejects. So:
#   - TORCH_CUDA_ARCH_LIST given (variable or environment): used as is;
#   - else CMAKE_CUDA_ARCHITECTURES (or CUDAARCHS) given: translated ("90" -> "9.0+PTX",
#     "90-real" -> "9.0", "90a" -> "9.0a", "native" -> "Auto");
#   - else the default list of setup.py, restricted to what the nvcc found supports.
# CMAKE_CUDA_ARCHITECTURES is then removed so torch does not warn, and targets with CUDA sources
# set their CUDA_ARCHITECTURES property to OFF.

# Before enable_language(CUDA): remember an architecture list the user gave the CMake way.
# Kept in the cache: a re-run of cmake (also one triggered by the build) must not forget it.
macro(psi_cuda_torch_arch_list_before_cuda)
  if(DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(PSI_CUDA_GIVEN_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}" CACHE INTERNAL "")
  elseif(DEFINED ENV{CUDAARCHS} AND NOT DEFINED PSI_CUDA_GIVEN_ARCHITECTURES)
    set(PSI_CUDA_GIVEN_ARCHITECTURES "$ENV{CUDAARCHS}" CACHE INTERNAL "")
  endif()
  set(_psi_cuda_user_archs "${PSI_CUDA_GIVEN_ARCHITECTURES}")
endmacro()

# After enable_language(CUDA) (which sets CMAKE_CUDA_COMPILER_VERSION and a default
# CMAKE_CUDA_ARCHITECTURES) and before find_package(Torch).
macro(psi_cuda_torch_arch_list_after_cuda)
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  if(DEFINED TORCH_CUDA_ARCH_LIST OR DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    if(_psi_cuda_user_archs)
      message(STATUS "psi_cuda: TORCH_CUDA_ARCH_LIST is set; ignoring CMAKE_CUDA_ARCHITECTURES")
    endif()
  elseif(_psi_cuda_user_archs)
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_arch IN LISTS _psi_cuda_user_archs)
      if(_arch STREQUAL "native")
        list(APPEND TORCH_CUDA_ARCH_LIST "Auto")
      elseif(_arch MATCHES "^([0-9]+)([0-9])([af]?)(-real|-virtual)?$")
        set(_torch_arch "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
        if(NOT CMAKE_MATCH_4 STREQUAL "-real")
          string(APPEND _torch_arch "+PTX")  # CMake's "90" and "90-virtual" both embed PTX
        endif()
        list(APPEND TORCH_CUDA_ARCH_LIST "${_torch_arch}")
      else()
        message(FATAL_ERROR "psi_cuda: cannot translate CUDA architecture '${_arch}' for torch; "
                            "set TORCH_CUDA_ARCH_LIST instead (e.g. \"8.0;9.0+PTX\")")
      endif()
    endforeach()
  elseif(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 13.0)
    set(TORCH_CUDA_ARCH_LIST "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX")
  elseif(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
    set(TORCH_CUDA_ARCH_LIST "7.0;8.0;8.6;8.9;9.0;10.0;12.0+PTX")
  else()
    set(TORCH_CUDA_ARCH_LIST "7.0;8.0;8.6;8.9;9.0+PTX")
  endif()
  if(DEFINED TORCH_CUDA_ARCH_LIST)
    message(STATUS "psi_cuda: TORCH_CUDA_ARCH_LIST = ${TORCH_CUDA_ARCH_LIST}")
  else()
    message(STATUS "psi_cuda: TORCH_CUDA_ARCH_LIST (environment) = $ENV{TORCH_CUDA_ARCH_LIST}")
  endif()
endmacro()
